"""Starting local ranks: the one helper the tests, the benchmarks and the planner's measurements spawn with.

`spawn_ranks(fn, args, world)` runs `fn(rank, *args)` in `world` fresh processes (torch.multiprocessing's
spawn) that form one torch.distributed group on this machine: each gets RANK, LOCAL_RANK, WORLD_SIZE and
MASTER_ADDR/MASTER_PORT on a free loopback port, and `threads` torch threads. A rank leaves without the
interpreter's finalization once `fn` returns (`process.run_then_leave`). An exception in a rank raises here
as torch's spawn reports it; a group still running after `timeout_s` is killed and raises TimeoutError, since
gloo hangs rather than fails when ranks disagree.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from moeyard.train.process import run_then_leave


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free now on `host` (the kernel's pick): loopback for local ranks, "" (every interface) for
    a rendezvous that other nodes reach."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def local_rank_env(rank: int, world: int, port: int, threads: int = 1) -> None:
    """The torch.distributed environment of rank `rank` of a `world`-process group on this machine."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(threads)


def _rank(rank: int, world: int, port: int, threads: int, fn: Callable, *args: object) -> None:
    local_rank_env(rank, world, port, threads)
    run_then_leave(rank, fn, *args)


def spawn_ranks(
    fn: Callable, args: tuple, world: int, timeout_s: float = 900.0, threads: int = 1, what: str = "ranks"
) -> None:
    """Runs `fn(rank, *args)` on `world` local ranks (module docstring); kills them all after `timeout_s`."""
    port = free_port()
    ctx = mp.start_processes(_rank, (world, port, threads, fn, *args), nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} on {world} ranks still running after {timeout_s:g}s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
