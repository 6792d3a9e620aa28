"""Parallel folding: tensor-parallel ranks share each MoE layer's work instead of repeating it.

Under tp2 each rank routes its half of every sequence and runs the experts on those rows only: per rank, the
expert and router FLOPs of one training step (forward + backward, counted by torch's FlopCounterMode) are
exactly half of one process's, and over both ranks they add up to one process's. Exactness of training
under folding is the golden suite's job (tests/multiproc/test_golden.py: tp2, tp2-ep2, tp2·pp2·ep2, ...).

    .venv/bin/pytest -q tests/multiproc/test_folding.py
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moeyard.job.compose import compose
from moeyard.train.trainer import Trainer
from tests.helpers import flop_counter, free_port, local_rank_env, spawn

BASE = [
    "model=debug",
    "train.seq_len=32",
    "train.batch_size=4",
    "profiling=off",
    "train.eval_every=0",
    "train.log_every=1",
]


def moe_flops(trainer: Trainer) -> dict[str, int]:
    """FLOPs of one step's forward + backward, summed over the MoE experts and over the routers."""
    x, y = trainer.data.batch(0, trainer.cfg.train.batch_size)
    x, y = trainer.local_rows(x), trainer.local_rows(y)
    with flop_counter() as counter:
        trainer.forward_backward(x, y)
    flops = {module: sum(counts.values()) for module, counts in counter.get_flop_counts().items()}
    moe = [m for m in flops if m.endswith(".moe")]
    router = sum(flops.get(f"{m}.router", 0) for m in moe)
    shared = sum(flops.get(f"{m}.shared_experts", 0) for m in moe)
    # The routed experts' grouped matmuls are what the MoE layer counts beyond its router and shared experts.
    return {"experts": sum(flops[m] for m in moe) - router - shared, "router": router, "shared": shared}


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    local_rank_env(rank, world, port)
    trainer = Trainer(compose([*BASE, *overrides, f"run.dir={out}.run"]))
    torch.save(moe_flops(trainer), f"{out}.{rank}")
    if dist.is_initialized():
        dist.destroy_process_group()


def flops_per_rank(overrides: list[str], world: int, out: str) -> list[dict[str, int]]:
    spawn(_rank, (world, free_port(), overrides, out), world)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.tp=2", "parallel.ep=2"]], ids=["tp2", "tp2-ep2"])
def test_tp2_halves_each_ranks_expert_flops(layout, tmp_path):
    (one,) = flops_per_rank([], 1, str(tmp_path / "tp1"))
    ranks = flops_per_rank(layout, 2, str(tmp_path / "tp2"))
    assert one["experts"] > 0 and one["router"] > 0
    for got in ranks:
        # Dropless top-k: every token has exactly K assignments, so half the tokens are exactly half the rows.
        assert got["experts"] * 2 == one["experts"], (got, one)
        assert got["router"] * 2 == one["router"], (got, one)
        assert got["shared"] * 2 == one["shared"], (got, one)
