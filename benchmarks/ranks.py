"""Spawning gloo ranks on this machine for the benchmark scripts (imported as `ranks` from beside them)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from moeyard.train.process import run_then_leave


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, threads: int) -> None:
    """The torch.distributed environment of one rank of a `world`-process group on this machine."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(threads)


def spawn_ranks(fn: Callable, args: tuple, world: int, timeout_s: float, what: str) -> None:
    """Runs fn(rank, world, port, *args) on `world` spawned ranks; kills them all after `timeout_s`."""
    # Each rank leaves without interpreter finalization once it has written its results (train.process.leave).
    ctx = mp.start_processes(
        run_then_leave, args=(fn, world, free_port(), *args), nprocs=world, start_method="spawn", join=False
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} still running after {timeout_s}s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
