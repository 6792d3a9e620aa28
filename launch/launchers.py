"""Launchers: start the ranks of a job whose config is already composed, validated and written resolved.

local: in this process (nproc_per_node=1) or `torchrun --standalone`; torchrun: one agent per node with c10d
rendezvous (standalone, on a free port, for one node without launcher.rdzv_endpoint); slurm: an sbatch script
(launch.slurm); mpi: mpiexec (launch.mpi). Every rank runs `python -P -m moeyard.launch.rank`
(launch/entry.py) and reads the resolved config.yaml named by MOEYARD_CONFIG. torchrun and mpiexec run under a
`Supervisor` (launch/supervise.py): a stop signal reaches every rank, and a stopped job ends in one line
saying where its checkpoint is. launcher.dry_run prints the command and starts nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from pathlib import Path

from moeyard.job.schema import ConfigError, JobConfig
from moeyard.launch.entry import rank_command, weight_loader
from moeyard.launch.mpi import mpi_command
from moeyard.launch.slurm import launch_slurm
from moeyard.launch.supervise import OutputFilter, Supervisor
from moeyard.parallel.checkpoint import checkpoint_root, complete_checkpoints
from moeyard.train.guard import Stopped, exit_on_stop_signals
from moeyard.train.trainer import train

FAILED_RANK = re.compile(r"^moeyard rank \d+ failed: ")  # the line launch/rank.py prints when a rank fails
RDZV_TIMEOUT = "RendezvousTimeoutError"
PORT_IN_USE = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)
NOTABLE = re.compile(f"{FAILED_RANK.pattern}|{RDZV_TIMEOUT}|{PORT_IN_USE.pattern}", re.IGNORECASE)


def torchrun_command(cfg: JobConfig) -> list[str]:
    """The torchrun (torch.distributed.run) command line of this node's agent."""
    lc = cfg.launcher
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={lc.nproc_per_node}"]
    if "max_restarts" in lc.fields_used():
        cmd.append(f"--max-restarts={lc.max_restarts}")
    if lc.standalone():  # a rendezvous on a free local port: jobs on one machine do not collide
        return [*cmd, "--standalone", "--nnodes=1", "--no-python", *rank_command()]
    # node_rank 0 hosts the c10d store at rdzv_endpoint; saying so beats torchrun's guess from host names,
    # which picks no host (or two) when the endpoint is an alias or several agents share a machine.
    rdzv_conf = f"join_timeout={lc.timeout_s},is_host={'true' if lc.node_rank == 0 else 'false'}"
    return [
        *cmd,
        f"--nnodes={lc.nnodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={lc.rdzv_endpoint}",
        f"--rdzv-id={lc.rdzv_id}",
        f"--rdzv-conf={rdzv_conf}",
        "--no-python",
        *rank_command(),
    ]


def failure_line(cfg: JobConfig, what: str, status: int, notable: list[str]) -> str:
    """One line that says why the ranks failed, for the cases we can tell apart."""
    lc, logs = cfg.launcher, Path(cfg.run.dir) / "logs"
    if any(RDZV_TIMEOUT in line for line in notable):
        return (
            f"torchrun rendezvous at {lc.rendezvous()} timed out after launcher.timeout_s={lc.timeout_s}: "
            f"not all launcher.nnodes={lc.nnodes} agents joined (start one per node with the same run.dir)"
        )
    failed = [line for line in notable if FAILED_RANK.match(line)]
    if failed:
        return f"{what} exited with status {status}: {failed[0]}"
    if any(PORT_IN_USE.search(line) for line in notable):
        return (
            f"torchrun rendezvous at {lc.rendezvous()} failed: the port is already in use on this host (rule: pick "
            "a free port, or leave launcher.rdzv_endpoint unset on one node)"
        )
    return f"{what} exited with status {status}: see {logs} and the output above"


def newest_checkpoint(cfg: JobConfig) -> tuple[int, Path] | None:
    """(save sequence number, path) of the run's newest complete checkpoint, or None."""
    found = complete_checkpoints(checkpoint_root(cfg.run.dir))
    return found[-1] if found else None


def stop_line(cfg: JobConfig, signum: int, before: tuple[int, Path] | None) -> str:
    """Where a job stopped by `signum` left its checkpoint, or that it saved none and why."""
    name, now = signal.Signals(signum).name, newest_checkpoint(cfg)
    if now is not None and (before is None or now[0] > before[0]):
        return f"stopped by {name}; checkpoint saved at {now[1]} (continue with train.resume=auto)"
    older = f"; the newest checkpoint is still {now[1]}" if now else ""
    if not cfg.checkpoint.enabled:
        return f"stopped by {name}; saved no checkpoint (checkpoint.enabled=false){older}"
    return (
        f"stopped by {name} before a checkpoint was saved (no step had finished, or the ranks were killed after "
        f"launcher.timeout_s={cfg.launcher.timeout_s}; see {Path(cfg.run.dir) / 'logs'}){older}"
    )


def supervise(cfg: JobConfig, cmd: list[str], env: dict[str, str], what: str) -> int:
    """Runs torchrun or mpiexec under a Supervisor; ends a failed or stopped job with one line."""
    before = newest_checkpoint(cfg)
    output = OutputFilter(NOTABLE)
    supervisor = Supervisor(grace_s=cfg.launcher.timeout_s)
    status = supervisor.run(cmd, env, output)
    output.write_held(Path(cfg.run.dir) / "logs" / "launcher.log")
    if status and supervisor.signum is not None:
        print(f"moeyard: {stop_line(cfg, supervisor.signum, before)}", file=sys.stderr)
        return 128 + supervisor.signum
    if status:
        print(f"moeyard: {failure_line(cfg, what, status, output.notable)}", file=sys.stderr)
    return status


def run_in_process(cfg: JobConfig) -> int:
    """The one rank, in this process: a stop signal saves (once training has begun) and ends it in one line."""
    before = newest_checkpoint(cfg)
    previous = exit_on_stop_signals()
    try:
        train(cfg, cfg.launcher.timeout_s, weight_loader(cfg))
        return 0
    except Stopped as stop:
        print(f"moeyard: {stop_line(cfg, stop.signum, before)}", file=sys.stderr)
        return stop.code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launch(cfg: JobConfig, config_path: Path) -> int:
    """Starts the configured launcher; returns its exit status. Pre-spawn problems raise ConfigError."""
    lc = cfg.launcher
    config_path = config_path.resolve()
    if lc.name == "slurm":
        return launch_slurm(cfg, config_path)
    if lc.name not in ("local", "torchrun", "mpi"):
        raise ConfigError(f"launcher.name={lc.name} must be one of local, torchrun, slurm, mpi")
    env = {**os.environ, "MOEYARD_CONFIG": str(config_path)}
    if lc.name == "mpi":
        cmd, what = mpi_command(cfg), lc.mpirun
    elif lc.in_process():
        cmd, what = rank_command(), "moeyard"
    else:
        cmd, what = torchrun_command(cfg), "torchrun"
        env.setdefault("OMP_NUM_THREADS", "1")  # what every rank defaults to anyway; spares torchrun's banner
        if lc.max_restarts and "max_restarts" in lc.fields_used():
            # A restarted worker group cannot rejoin an agent-shared rendezvous store (pytorch#135712): give
            # each round its own store so launcher.max_restarts works.
            env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if lc.dry_run:
        print(f"MOEYARD_CONFIG={shlex.quote(str(config_path))} {shlex.join(cmd)}")
        return 0
    if lc.in_process():
        return run_in_process(cfg)
    return supervise(cfg, cmd, env, what)
