"""FSDP's collectives per training step, counted from the collective log against what the model's structure
implies: all-gathers and reduce-scatters of pp2 x dp2 FSDP (4 ranks) and of dp2 FSDP (2 ranks), both with 4
micro-batches, and the all-reduces of gradient clipping.

- Under a pipeline, every FSDP unit of a stage (root, blocks, experts) is gathered once a step and its
  gradients reduce-scattered once, however many micro-batches the schedule runs.
- Without one, a block is gathered for each micro-batch's forward and again for its backward (FSDP2
  reshards it after forward), the root once per micro-batch (kept from forward to backward), and gradients
  are reduce-scattered once a step, in the last micro-batch's backward.
- Clipping makes one all-reduce per set of ranks that splits parameters, then one over pp, and with the
  parameters as gradients the norm is the gathered full model's: every element counted exactly once.

Both layouts run in one spawned group of 4 processes: the pipelined run on all 4, then a 2-rank group on
ranks 0 and 1 (~40 s on 2 idle cores).

    .venv/bin/pytest -q tests/multiproc/test_collective_counts.py
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from moeyard.job.compose import compose
from moeyard.parallel.grads import clip_grads
from moeyard.parallel.pipeline import local_stage_ids, stage_layer_ranges
from moeyard.parallel.state import full_state_dict
from moeyard.train.collectives import CollectiveLog, recording
from moeyard.train.spawn import free_port, local_rank_env
from tests.helpers import make_trainer, spawn

pytestmark = pytest.mark.multiproc

MICRO_BATCHES = 4
STEPS = 2
BASE = [
    "model=debug",
    f"train.steps={STEPS}",
    "train.batch_size=16",  # 2 rows per micro-batch and dp rank: 1 is a strided view, which torch 2.11 rejects
    "train.seq_len=32",
    f"train.micro_batches={MICRO_BATCHES}",
    "train.eval_every=0",
    "data.max_files=20",
    "profiling=off",
]
PIPELINED = [*BASE, "parallel.pp=2", "parallel.dp=2", "parallel.dp_mode=fsdp"]
FLAT = [*BASE, "parallel.dp=2", "parallel.dp_mode=fsdp"]
GATHER, SCATTER = ("all_gather_single", "all_gather_into_tensor"), ("reduce_scatter_single", "reduce_scatter_tensor")


def _counts(overrides: list[str], run_dir: str) -> dict:
    """Trains `overrides` recording every collective; then clips all-ones gradients with a fresh log."""
    cfg = compose([*overrides, f"run.dir={run_dir}"])
    log = CollectiveLog(size=1_000_000)
    with recording(log):
        trainer = make_trainer(cfg, collectives=log)
        buffers = {f"layers.{lid}.moe.router.expert_bias" for lid in range(cfg.model.n_layers)}
        trainer.fit()
        per_step = Counter()
        for step, op, *_ in log.entries:
            kind = "gather" if op in GATHER else "scatter" if op in SCATTER else None
            if kind and isinstance(step, int):
                per_step[step, kind] += 1
        full = full_state_dict(trainer.pm)  # every rank: a collective, before the count
        want = math.sqrt(sum(float(v.double().square().sum()) for k, v in full.items() if k not in buffers))
        params = trainer.pm.named_parameters()
        for _, p in params:  # gradients that differ from shard to shard: the parameters themselves
            p.grad = p.detach().clone()
        log.entries.clear()
        g = trainer.pm.groups
        norm = clip_grads(params, 1.0, g.ep, g.pp)
        clip_reduces = sum(op == "all_reduce" for _, op, *_ in log.entries)
    # Groups of the two meshes over the same ranks (dp and edp when ep = 1) are one group to reduce over.
    splitting = {tuple(dist.get_process_group_ranks(x)) for x in (g.dp, g.edp, g.ep, g.tp) if x is not None}
    return {
        "per_step": dict(per_step),
        "fsdp_units": sum(isinstance(m, FSDPModule) for part in trainer.pm.parts for m in part.modules()),
        "stage_ids": list(trainer.pm.stage_ids),
        "clip_reduces": clip_reduces,
        "clip_groups": len(splitting) + (g.pp is not None),
        "norm": float(norm),
        "full_norm": want,
    }


def _rank(rank: int, world: int, flat_port: int, out: str) -> None:
    results = {"pipelined": _counts(PIPELINED, f"{out}/pipelined")}
    dist.destroy_process_group()
    if rank < 2:  # the same processes, a new 2-rank group
        local_rank_env(rank, 2, flat_port)
        results["flat"] = _counts(FLAT, f"{out}/flat")
        dist.destroy_process_group()
    torch.save(results, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("counts")
    spawn(_rank, (4, free_port(), str(out)), 4, timeout_s=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(4)]


def _units(overrides: list[str], stage_ids: list[int], pp: int) -> tuple[int, int]:
    """(FSDP units of one rank, of which blocks and experts) from the config: one per block, one per MoE
    block's experts, and the rank's root (embedding, final norm, output)."""
    model = compose(overrides).model
    ranges = stage_layer_ranges(model.n_layers, pp, [])
    layers = [i for sid in stage_ids for i in range(*ranges[sid])]
    inner = len(layers) + sum(model.is_moe_layer(i) for i in layers)
    return 1 + inner, inner


@pytest.mark.timeout(300)
def test_pipelined_fsdp_gathers_and_reduces_each_unit_once_a_step(ranks):
    for rank, result in enumerate(ranks):
        got = result["pipelined"]
        assert got["stage_ids"] == local_stage_ids(rank // 2, 2, 1)
        units, _ = _units(PIPELINED, got["stage_ids"], pp=2)
        assert got["fsdp_units"] == units, f"rank {rank}: the config implies {units} FSDP units"
        for step in range(1, STEPS + 1):
            want = {(step, "gather"): units, (step, "scatter"): units}
            assert {k: got["per_step"].get(k) for k in want} == want, f"rank {rank}, {MICRO_BATCHES} micro-batches"


@pytest.mark.timeout(300)
def test_fsdp_without_pipeline_reduces_once_a_step(ranks):
    for rank, result in enumerate(ranks[:2]):
        got = result["flat"]
        units, inner = _units(FLAT, [0], pp=1)
        assert got["fsdp_units"] == units
        gathers = MICRO_BATCHES * (1 + 2 * inner)  # root once, blocks and experts in forward and in backward
        for step in range(1, STEPS + 1):
            want = {(step, "gather"): gathers, (step, "scatter"): units}
            assert {k: got["per_step"].get(k) for k in want} == want, f"rank {rank}, {MICRO_BATCHES} micro-batches"


NORM_RTOL = 1e-4
"""The norm of the parameters as gradients, against the gathered full model's in fp64. fp32 sums of < 2**20
squares, blockwise, are within about log2(2**20) * 2**-24 = 1.2e-6 of it; a shard counted twice or left
out moves it by at least that shard's share of the squares, above 1e-3 for every set of shards here (each
holds all of a kind of weight: the blocks' dense weights, or their experts)."""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["pipelined", "flat"])
def test_clipping_reduces_once_per_group(ranks, layout):
    results = [r[layout] for r in ranks if layout in r]
    for rank, got in enumerate(results):
        assert got["clip_reduces"] == got["clip_groups"], f"rank {rank}: one all-reduce per group splitting params"
        assert math.isclose(got["norm"], got["full_norm"], rel_tol=NORM_RTOL), (rank, got["norm"], got["full_norm"])
