"""`python -P -m moeyard.launch.rank` (launch/entry.py): the module every launcher starts once per rank.

It reads the resolved config named by MOEYARD_CONFIG, turns the launcher's environment into the
torch.distributed one (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), sends the output of every
rank but 0 to RUN_DIR/logs/rank_N.log, joins the process group and trains (or, where MOEYARD_GENERATE names
a request of `moeyard generate` in a layout, generates: interop/generate_ranks.py). torchrun sets the torch
variables itself; srun tasks (launch.slurm) and MPI ranks (launch.mpi) get them translated here.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import TextIO

from moeyard.job.compose import load_resolved
from moeyard.job.schema import JobConfig
from moeyard.launch.entry import GENERATE_ENV, weight_loader
from moeyard.launch.mpi import rank_env_from_mpi
from moeyard.launch.slurm import rank_env_from_slurm
from moeyard.train.guard import exit_on_stop_signals
from moeyard.train.process import leave, report_fatal_signals
from moeyard.train.trainer import init_distributed, pick_device, train


def rank_env(cfg: JobConfig) -> dict[str, str]:
    """The torch.distributed variables this process lacks, from the launcher that started it."""
    source = cfg.launcher.rank_env_source()
    if source == "srun":
        return rank_env_from_slurm(os.environ)
    if source == "mpi":
        return rank_env_from_mpi()
    return {}  # started by torchrun (launcher local, torchrun, or slurm mode=torchrun)


def rank_log(run_dir: Path, rank: int) -> Path:
    return run_dir / "logs" / f"rank_{rank}.log"


def redirect_output(path: Path) -> None:
    """Points this process's stdout and stderr (file descriptors, so C++ warnings too) at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def join_process_group(cfg: JobConfig) -> None:
    """Rendezvous with the other ranks; any failure here is reported as the rendezvous failing."""
    device = pick_device(cfg.train.device)
    try:
        init_distributed(device, cfg.launcher.timeout_s)
    except Exception as err:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        first = (str(err).strip().splitlines() or [""])[0]
        raise RuntimeError(
            f"rendezvous of {os.environ.get('WORLD_SIZE')} ranks at {where} failed "
            f"(launcher.timeout_s={cfg.launcher.timeout_s}): {type(err).__name__}: {first}"
        ) from err


def run(cfg: JobConfig, console: TextIO) -> int:
    """Trains this rank; a failing rank prints one line to the console (and its traceback to its log)."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            join_process_group(cfg)
        request = os.environ.get(GENERATE_ENV)
        if request:  # `moeyard generate` in a layout: only then is the interop code imported
            from moeyard.interop.generate_ranks import generate_on_ranks

            generate_on_ranks(cfg, Path(request), cfg.launcher.timeout_s)
        else:
            train(cfg, cfg.launcher.timeout_s, weight_loader(cfg))
        return 0
    except Exception as err:
        traceback.print_exc()
        first = (str(err).strip().splitlines() or [""])[0]
        where = f" (log: {rank_log(Path(cfg.run.dir), rank)})" if rank else ""
        print(f"moeyard rank {rank} failed: {type(err).__name__}: {first}{where}", file=console, flush=True)
        return 1


def main() -> int:
    exit_on_stop_signals()  # a stop before the first step ends the rank quietly; the step guard takes over then
    # One thread per rank unless told otherwise, as torchrun does: ranks sharing a node would oversubscribe.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = load_resolved(os.environ["MOEYARD_CONFIG"])
    os.environ.update(rank_env(cfg))
    console = os.fdopen(os.dup(2), "w")  # kept before redirecting, for the one-line failure notice
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        redirect_output(rank_log(Path(cfg.run.dir), rank))
    report_fatal_signals()  # into the rank's log (file descriptor 2, redirected above)
    status = run(cfg, console)
    if status and cfg.launcher.rank_env_source() == "mpi":
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(status)  # the other ranks may wait in a collective: end the whole job
    return status


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as stop:  # a stopped run exits 128+signal once its checkpoint is saved (train.guard)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    leave(code)
