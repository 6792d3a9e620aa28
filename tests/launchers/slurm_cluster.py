"""A real two-node Slurm cluster on this machine, for the launcher tests (not a test module itself).

munged, slurmctld and two `slurmd -D -N nX` run in the foreground as our own children, on free loopback
ports, with every file (config, key, sockets, state, logs) inside one private directory; `stop()` ends
exactly those processes. Both "nodes" have NodeAddr=127.0.0.1, and their names (n1, n2) do not resolve,
which is what the launcher's NodeAddr fallback is for. Needs root and Debian's slurm-wlm + munge
(`.ci/system-deps.sh`). By hand:
    python -m tests.slurm_cluster DIR     # starts it, prints `export SLURM_CONF=...`, Ctrl-C stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from moeyard.train.spawn import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo")
NODES = ("n1", "n2")


def which(name: str) -> str | None:
    """`name` on PATH, or in /usr/sbin where Debian puts the daemons (outside a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if which(name) is None]


def _slurm_conf(root: Path, ctld_port: int, node_ports: list[int], cpus: int) -> str:
    nodes = "\n".join(
        f"NodeName={n} NodeAddr=127.0.0.1 NodeHostname={n} Port={p} CPUs={cpus} State=UNKNOWN"
        for n, p in zip(NODES, node_ports, strict=True)
    )
    return f"""ClusterName=moeyard
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
MinJobAge=600
{nodes}
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged + slurmctld + slurmd n1, n2 under `root`; `env` points Slurm's client commands at it."""

    def __init__(self, root: Path, cpus_per_node: int = 2) -> None:
        self.root = root.resolve()
        self.cpus = cpus_per_node
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.root / f"{name}.stdout").open("w")
        self.procs.append(subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start(self, timeout_s: float = 30.0) -> SlurmCluster:
        if os.geteuid() != 0:
            raise RuntimeError("Slurm test cluster needs root: slurmd starts each job step as its user")
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Slurm test cluster needs {missing}: run `bash .ci/system-deps.sh` as root")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # munged refuses a socket directory others can write
        (self.root / "state").mkdir(exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        conf = _slurm_conf(self.root, free_port(), [free_port() for _ in NODES], self.cpus)
        (self.root / "slurm.conf").write_text(conf)
        r = self.root
        self._spawn(
            "munged",
            [
                which("munged"),
                "-F",
                "--force",
                f"--socket={r}/munge.sock",
                f"--key-file={key}",
                f"--pid-file={r}/munged.pid",
                f"--log-file={r}/munged.log",
                f"--seed-file={r}/munged.seed",
            ],
        )
        self._wait_for(lambda: (r / "munge.sock").exists(), timeout_s, "munged socket")
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i"])
        for node in NODES:
            self._spawn(f"slurmd-{node}", [which("slurmd"), "-D", "-N", node])
        self._wait_for(self._nodes_idle, timeout_s, "both nodes idle in sinfo")
        return self

    def _nodes_idle(self) -> bool:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True, timeout=10
        )
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                logs = "; ".join(f"{f.name}: {f.read_text()[-300:]}" for f in sorted(self.root.glob("*.log")))
                raise RuntimeError(f"Slurm test cluster: no {what} (exited: {dead}); {logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Ends exactly the daemons this object started (slurmd first, munged last)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.procs.clear()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the daemons on `kill` too
    cluster = SlurmCluster(Path(sys.argv[1])).start()
    print(f"export SLURM_CONF={cluster.env['SLURM_CONF']}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
