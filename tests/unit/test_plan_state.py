"""The planner's model state is exact: what it counts from two-block probes equals full meta-device builds.

`parallel.memory.stage_memory` derives every pipeline position's parameters from a model of one dense and one
MoE block built on the meta device under the layout's tp and ep, FSDP's torch.chunk split, and the stage's
layer ranges. Here each pipeline position of several layouts (TP, EP folded over dp x tp, FSDP with uneven
pipeline stages, interleaved virtual stages, experts split along their second dim, MLA, shared experts, a
dense prefix) is also built whole under a fake process group (`meta_rank`) and counted by `rank_memory`:
parameters and parameter tensors must match exactly, and so must the gathered FSDP units. (The bytes of real
ranks' parameters, gradients and AdamW state are checked against the same count in
tests/multiproc/test_plan_cpu.py.)

Run: .venv/bin/pytest -q tests/unit/test_plan_state.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from moeyard.job.compose import compose
from moeyard.parallel.dims import ParallelDims
from moeyard.parallel.memory import meta_rank, probe_shards, rank_memory, stage_memory

CASES = [
    (["model=debug"], dict(tp=2, pp=2, ep=2, dp=2, dp_mode="fsdp"), 8),
    (
        ["model=debug", "model.first_dense_layers=1", "moe.num_shared_experts=1"],
        dict(tp=1, pp=2, ep=4, dp=4, dp_mode="fsdp", pp_schedule="interleaved_1f1b", pp_stages_per_rank=2),
        8,
    ),
    (["model=debug"], dict(tp=2, pp=1, ep=4, dp=2, dp_mode="replicate"), 4),
    # One expert per ep rank and two edp ranks: FSDP splits the experts' second dim.
    (["model=debug", "moe.num_experts=2", "moe.top_k=1"], dict(tp=2, pp=1, ep=2, dp=2, dp_mode="fsdp"), 4),
    (["model=mixtral_8x7b"], dict(tp=2, pp=4, ep=8, dp=4, dp_mode="fsdp"), 32),
    (["model=deepseek_v3"], dict(tp=2, pp=4, ep=64, dp=32, dp_mode="fsdp", pp_layers=[16, 15, 15, 15]), 256),
]


@pytest.mark.parametrize("overrides, layout, world", CASES, ids=lambda c: str(c)[:40])
def test_probe_counts_equal_full_builds(overrides, layout, world):
    cfg = compose(overrides)
    pcfg = replace(cfg.parallel, **layout)
    dims = ParallelDims.from_config(pcfg, world)
    probe = probe_shards(cfg.model, cfg.moe, pcfg, dims.tp, dims.ep)
    for pp_rank in range(dims.pp):
        rank = pp_rank * dims.dp * dims.tp + dims.dp * dims.tp - 1  # the last rank of the stage
        with meta_rank(cfg.model, cfg.moe, pcfg, world, rank, bf16=True) as pm:
            want = rank_memory(pm, bf16=True)
        got = stage_memory(probe, cfg.model, pcfg, dims, pp_rank, bf16=True)
        assert (got.params, got.tensors) == (want.params, want.tensors), (pp_rank, got, want)
        gathered = lambda m: (m.gathered_root, m.gathered_block, m.gathered_blocks)  # noqa: E731
        assert gathered(got) == gathered(want), pp_rank
        assert got.state_bytes == 16 * want.params + 4 * want.tensors
