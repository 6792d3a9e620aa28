"""MPI: `mpiexec -n NP python -P -m moeyard.launch.rank`, with mpi4py standing in for torchrun's rendezvous.

torch has no MPI backend in its pip wheels, so MPI only starts the processes and introduces them: mpi4py gives
each its rank, world size and node-local rank, rank 0 picks a free port and broadcasts its address, and
torch.distributed then starts on gloo (CPU) or NCCL (GPU) over TCP as with any other launcher.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path

from moeyard.job.schema import ConfigError, JobConfig
from moeyard.launch.entry import rank_command
from moeyard.train.spawn import free_port


def find_mpirun(name: str) -> str:
    """The MPI launcher: `name` on PATH, else beside the running python (where the mpich wheel puts it)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise ConfigError(
            f"launcher.mpirun={name} was not found on PATH or in {Path(sys.executable).parent} "
            "(install an MPI, e.g. `pip install mpich`, or name its mpiexec)"
        )
    if importlib.util.find_spec("mpi4py") is None:
        raise ConfigError("launcher=mpi needs the mpi4py package (`pip install mpi4py mpich`)")
    return found


def mpi_command(cfg: JobConfig) -> list[str]:
    lc = cfg.launcher
    return [find_mpirun(lc.mpirun), *lc.mpi_args, "-n", str(lc.np), *rank_command()]


def master_address(hosts: list[str]) -> str:
    """Rank 0's address for the others: loopback when every rank shares its host, else its resolved name."""
    if len(set(hosts)) == 1:
        return "127.0.0.1"
    addr = socket.gethostbyname(socket.getfqdn())
    if addr.startswith("127."):
        raise RuntimeError(
            f"launcher=mpi: rank 0's host name resolves to {addr}, which other nodes cannot reach; "
            "export MASTER_ADDR=<its address> before mpiexec"
        )
    return addr


def rank_env_from_mpi() -> dict[str, str]:
    """The torch.distributed variables of this MPI rank; collective over MPI.COMM_WORLD."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    hosts = comm.allgather(MPI.Get_processor_name())
    where = None
    if comm.rank == 0:
        addr = os.environ.get("MASTER_ADDR") or master_address(hosts)
        where = (addr, os.environ.get("MASTER_PORT") or str(free_port("")))  # every interface: other hosts connect
    addr, port = comm.bcast(where, root=0)
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).rank  # portable across MPICH and Open MPI
    return {
        "RANK": str(comm.rank),
        "WORLD_SIZE": str(comm.size),
        "LOCAL_RANK": str(local_rank),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }
