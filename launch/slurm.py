"""Slurm: the sbatch script rendered from the config, submitting and following a job, and the in-job ranks.

Outside the job, `launch_slurm` writes RUN_DIR/job.sbatch, prints it (launcher.dry_run) or submits it,
and with launcher.wait follows the job by polling `scontrol show job` (`sbatch --wait` polls slowly).
Inside the job, the batch step runs `python -m moeyard.launch.slurm master` once to export MASTER_ADDR/MASTER_PORT:
the first node's address (node names may not resolve, so it falls back to the NodeAddr Slurm knows) and a
port free there. Then either srun starts one `moeyard.launch.rank` per task (mode=srun; ranks from
SLURM_PROCID/NTASKS/LOCALID) or one torchrun agent per node (mode=torchrun).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from moeyard.job.schema import ConfigError, JobConfig, LauncherConfig
from moeyard.launch.entry import rank_command
from moeyard.train.spawn import free_port

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING"}
POLL_S = 1.0
TAIL_LINES = 20


def sbatch_header(lc: LauncherConfig, name: str, workdir: Path, output: Path) -> list[str]:
    """The #SBATCH lines: resources from the launcher config, then where the job runs and logs."""
    opts = [f"--job-name={name}", f"--nodes={lc.nodes}", f"--ntasks-per-node={lc.tasks_per_node}"]
    if lc.gpus_per_node:
        opts.append(f"--gpus-per-node={lc.gpus_per_node}")
    opts += [
        f"--{key}={value}"
        for key, value in (
            ("partition", lc.partition),
            ("account", lc.account),
            ("time", lc.time),
            ("constraint", lc.constraint),
        )
        if value
    ]
    if lc.exclusive:
        opts.append("--exclusive")
    if lc.signal_s:  # SIGTERM to every rank that long before the time limit: the ranks save, then exit
        opts.append(f"--signal=TERM@{lc.signal_s}")
    opts += [f"--chdir={workdir}", f"--output={output}"]
    return [f"#SBATCH {opt}" for opt in opts]


def step_command(cfg: JobConfig, python: str) -> str:
    """The srun line: one rank per task, or one torchrun agent per node rendezvousing at the first node."""
    lc = cfg.launcher
    srun = "srun --kill-on-bad-exit=1"
    if lc.mode == "srun":
        return f"{srun} {shlex.join(rank_command(python))}"
    return " \\\n    ".join(
        [
            f"{srun} --ntasks-per-node=1 --ntasks=$SLURM_JOB_NUM_NODES",
            f"{python} -m torch.distributed.run --nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node={lc.tasks_per_node}",
            f"--max-restarts={lc.max_restarts} --rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT",
            f"--rdzv-id=$SLURM_JOB_ID --rdzv-conf=join_timeout={lc.timeout_s}",
            f"--no-python {shlex.join(rank_command(python))}",
        ]
    )


def render_sbatch(cfg: JobConfig, config_path: Path, workdir: Path) -> str:
    """The whole batch script for this config; every rank reads `config_path`."""
    lc = cfg.launcher
    python = shlex.quote(lc.python or sys.executable)
    output = config_path.parent / "logs" / "slurm-%j.out"
    lines = [
        "#!/bin/bash",
        *sbatch_header(lc, f"moeyard-{cfg.model.name}", workdir, output),
        "# Written by moeyard. Every rank reads MOEYARD_CONFIG; rank 0 logs here, rank N to logs/rank_N.log.",
        "set -eo pipefail",
        *lc.setup,
        f"export MOEYARD_CONFIG={shlex.quote(str(config_path))}",
        "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1  # torchrun restarts get a fresh rendezvous store",
        "# The first node's address (its name may not resolve) and a port free there.",
        f'eval "$({python} -m moeyard.launch.slurm master)"',
        step_command(cfg, python),
    ]
    return "\n".join(lines) + "\n"


def scontrol_fields(args: list[str]) -> dict[str, str]:
    """`scontrol show ... -o` as a dict of its Key=Value fields (empty when Slurm knows no such thing)."""
    out = subprocess.run(["scontrol", "show", *args, "-o"], capture_output=True, text=True, timeout=60)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout)) if out.returncode == 0 else {}


def job_state(job_id: str) -> tuple[str, str]:
    """(state, exit code "status:signal") from scontrol, or from sacct once the job has left slurmctld."""
    info = scontrol_fields(["job", job_id])
    if info:
        return info.get("JobState", "UNKNOWN"), info.get("ExitCode", "0:0")
    if shutil.which("sacct"):
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        rows = [line.split("|") for line in out.stdout.split() if "|" in line]
        if rows:
            return rows[0][0].split()[0], rows[0][1]
    raise RuntimeError(f"slurm job {job_id} is unknown to scontrol and sacct")


def exit_status(state: str, exit_code: str) -> int:
    """Shell-style status: the job's exit code, 128+signal, or 1 for a job Slurm ended (timeout, cancel)."""
    status, _, signal = exit_code.partition(":")
    if int(status or 0):
        return int(status)
    if int(signal or 0):
        return 128 + int(signal)
    return 0 if state == "COMPLETED" else 1


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no output file)"


def follow(job_id: str, output: Path) -> int:
    """Echoes the job's output as it grows until the job ends; returns its exit status."""
    shown = 0
    while True:
        state, code = job_state(job_id)
        if output.exists():
            data = output.read_bytes()
            sys.stdout.write(data[shown:].decode(errors="replace"))
            sys.stdout.flush()
            shown = len(data)
        if state not in ACTIVE_STATES:
            break
        time.sleep(POLL_S)
    status = exit_status(state, code)
    if status:
        print(
            f"moeyard: slurm job {job_id} ended {state} with exit status {status}; last lines of {output}:\n"
            f"{tail(output)}",
            file=sys.stderr,
        )
    return status


def launch_slurm(cfg: JobConfig, config_path: Path) -> int:
    """Writes RUN_DIR/job.sbatch; prints it (dry_run) or submits it; with launcher.wait follows the job."""
    lc = cfg.launcher
    run_dir = config_path.parent.resolve()
    script = render_sbatch(cfg, config_path.resolve(), Path.cwd())
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch does not create the output's directory
    (run_dir / "job.sbatch").write_text(script)
    if lc.dry_run:
        print(script, end="")
        return 0
    for tool in ("sbatch", "scontrol"):
        if shutil.which(tool) is None:
            raise ConfigError(
                f"launcher=slurm needs `{tool}` on PATH (not found): run on a Slurm login node, "
                "or set launcher.dry_run=true to only print the script"
            )
    out = subprocess.run(
        ["sbatch", "--parsable", str(run_dir / "job.sbatch")], capture_output=True, text=True, timeout=120
    )
    if out.returncode:
        raise ConfigError(f"sbatch rejected the job: {' '.join(out.stderr.split())}")
    job_id = out.stdout.strip().split(";")[0]
    output = run_dir / "logs" / f"slurm-{job_id}.out"
    print(f"submitted slurm job {job_id}; run dir {run_dir}; output {output}", flush=True)
    if not lc.wait:
        return 0
    try:
        return follow(job_id, output)
    except KeyboardInterrupt:
        subprocess.run(["scancel", job_id], timeout=60)
        print(f"moeyard: cancelled slurm job {job_id}", file=sys.stderr)
        return 130


def node_address(name: str) -> str:
    """An IP address for a node: its name if it resolves, else the NodeAddr from `scontrol show node`."""
    try:
        return socket.gethostbyname(name)
    except OSError:
        addr = scontrol_fields(["node", name]).get("NodeAddr")
        if not addr:
            raise RuntimeError(f"node {name} does not resolve and scontrol knows no NodeAddr for it") from None
        return socket.gethostbyname(addr)


def first_node(env: Mapping[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"]
    out = subprocess.run(
        ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.split()[0]


def master_env(env: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR/PORT: kept when already set, else the first node and a port free on this (batch) host."""
    addr = env.get("MASTER_ADDR") or node_address(first_node(env))
    port = env.get("MASTER_PORT") or str(free_port(""))  # on every interface: the other nodes connect to it
    return {"MASTER_ADDR": addr, "MASTER_PORT": port}


def rank_env_from_slurm(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables of one srun task (mode=srun)."""
    if "SLURM_PROCID" not in env:
        raise RuntimeError("launcher=slurm mode=srun: no SLURM_PROCID; start ranks with srun inside the job")
    ranks = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" in env and "MASTER_PORT" in env:
        return ranks
    # Started by a hand-written srun: derive a port every task agrees on from the job id.
    port = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {**ranks, **master_env({**env, "MASTER_PORT": env.get("MASTER_PORT", port)})}


if __name__ == "__main__":
    if sys.argv[1:] != ["master"]:
        sys.exit("usage: python -m moeyard.launch.slurm master   (inside a Slurm job: prints MASTER_ADDR/PORT exports)")
    for key, value in master_env(os.environ).items():
        print(f"export {key}={shlex.quote(value)}")
