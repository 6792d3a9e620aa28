"""Launchers: start the ranks of a job whose config is already composed, validated and written resolved.

local: in this process (nproc_per_node=1) or `torchrun --standalone`; torchrun: one agent per node with c10d
rendezvous; slurm: an sbatch script (launch.slurm); mpi: mpiexec (launch.mpi). Every rank runs
`python -P -m moeyard.launch.rank` (launch/entry.py) and reads the resolved config.yaml named by MOEYARD_CONFIG.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from moeyard.job.schema import ConfigError, JobConfig
from moeyard.launch.entry import rank_command, weight_loader
from moeyard.launch.mpi import mpi_command
from moeyard.launch.slurm import launch_slurm
from moeyard.train.trainer import train

FAILED_RANK = re.compile(r"^moeyard rank \d+ failed: ")  # the line launch/rank.py prints when a rank fails
RDZV_TIMEOUT = "RendezvousTimeoutError"


def torchrun_command(cfg: JobConfig) -> list[str]:
    """The torchrun (torch.distributed.run) command line of this node's agent."""
    lc = cfg.launcher
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={lc.nproc_per_node}"]
    if lc.name == "local":
        return [*cmd, "--standalone", "--nnodes=1", "--no-python", *rank_command()]
    # node_rank 0 hosts the c10d store at rdzv_endpoint; saying so beats torchrun's guess from host names,
    # which picks no host (or two) when the endpoint is an alias or several agents share a machine.
    rdzv_conf = f"join_timeout={lc.timeout_s},is_host={'true' if lc.node_rank == 0 else 'false'}"
    return [
        *cmd,
        f"--nnodes={lc.nnodes}",
        f"--max-restarts={lc.max_restarts}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={lc.rdzv_endpoint}",
        f"--rdzv-id={lc.rdzv_id}",
        f"--rdzv-conf={rdzv_conf}",
        "--no-python",
        *rank_command(),
    ]


def run_streaming(cmd: list[str], env: dict[str, str]) -> tuple[int, list[str]]:
    """Runs `cmd`, echoing its stderr; returns its status and the stderr lines that explain a failure."""
    notable = []
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(line)
            if FAILED_RANK.match(line) or RDZV_TIMEOUT in line:
                notable.append(line.rstrip("\n"))
        return proc.wait(), notable


def failure_line(cfg: JobConfig, what: str, status: int, notable: list[str]) -> str:
    """One line that says why the ranks failed, for the cases we can tell apart."""
    lc = cfg.launcher
    if any(RDZV_TIMEOUT in line for line in notable):
        return (
            f"torchrun rendezvous at {lc.rdzv_endpoint} timed out after launcher.timeout_s={lc.timeout_s}: "
            f"not all launcher.nnodes={lc.nnodes} agents joined (start one per node with the same run.dir)"
        )
    failed = [line for line in notable if FAILED_RANK.match(line)]
    reason = failed[0] if failed else f"see {Path(cfg.run.dir) / 'logs'} and the output above"
    return f"{what} exited with status {status}: {reason}"


def launch_torchrun(cfg: JobConfig, env: dict[str, str]) -> int:
    status, notable = run_streaming(torchrun_command(cfg), env)
    if status:
        print(f"moeyard: {failure_line(cfg, 'torchrun', status, notable)}", file=sys.stderr)
    return status


def launch_mpi(cfg: JobConfig, env: dict[str, str]) -> int:
    status, notable = run_streaming(mpi_command(cfg), env)
    if status:
        print(f"moeyard: {failure_line(cfg, cfg.launcher.mpirun, status, notable)}", file=sys.stderr)
    return status


def launch(cfg: JobConfig, config_path: Path) -> int:
    """Starts the configured launcher; returns its exit status. Pre-spawn problems raise ConfigError."""
    lc = cfg.launcher
    config_path = config_path.resolve()
    if lc.name == "slurm":
        return launch_slurm(cfg, config_path)
    env = {**os.environ, "MOEYARD_CONFIG": str(config_path)}
    if lc.name == "local" and lc.nproc_per_node == 1:
        train(cfg, lc.timeout_s, weight_loader(cfg))
        return 0
    if lc.name in ("local", "torchrun"):
        # A restarted worker group cannot rejoin an agent-shared rendezvous store (pytorch#135712): give each
        # round its own store so launcher.max_restarts works.
        return launch_torchrun(cfg, {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **env})
    if lc.name == "mpi":
        return launch_mpi(cfg, env)
    raise ConfigError(f"launcher.name={lc.name} must be one of local, torchrun, slurm, mpi")
