"""Runs one layout of the golden check: trains, then writes losses and full parameters (rank 0).

Started by tests/test_golden.py through torch.multiprocessing; usable by hand:
    python -m tests.golden_worker OUT.pt WORLD key=value ...
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.config import compose
from launch.trainer import Trainer
from parallel.state import full_state_dict
from tests.launch_helpers import local_rank_env


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    local_rank_env(rank, world, port)
    cfg = compose(overrides)
    trainer = Trainer(cfg)
    history = trainer.fit()
    state = full_state_dict(trainer.pm)
    if rank == 0:
        torch.save({"history": history, "state": state}, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_layout(overrides: list[str], world: int, out: str, port: int) -> dict:
    """Trains `overrides` on `world` gloo ranks; returns {"history", "state"} from rank 0."""
    mp.start_processes(_rank, args=(world, port, overrides, out), nprocs=world, start_method="spawn")
    return torch.load(out, weights_only=True)


if __name__ == "__main__":
    result = run_layout(sys.argv[3:], int(sys.argv[2]), sys.argv[1], 29611)
    print([round(h["loss"], 6) for h in result["history"]])
