"""The planner's model state is exact: what it counts from two-block probes equals full meta-device builds.

`parallel.memory.stage_memory` derives every pipeline position's parameters from a model of one dense and one
MoE block built on the meta device under the layout's tp and ep, FSDP's torch.chunk split, and the stage's
layer ranges. Here each pipeline position of several layouts (TP, EP folded over dp x tp, FSDP with uneven
pipeline stages, interleaved virtual stages, experts split along their second dim, MLA, shared experts, a
dense prefix, ZeRO-1 and ZeRO-2, bf16 parameters with fp32 masters) is also built whole under a fake process
group (`meta_rank`) and counted by `rank_memory`: parameters, parameter tensors, zero1's slices and the
parameters' bytes must match exactly, and so must the gathered FSDP units; the bytes follow per mode. (The
bytes of real ranks' parameters, gradients and optimizer state are checked against the same count in
tests/multiproc/test_plan_cpu.py, and for the ZeRO modes in tests/multiproc/test_golden_zero.py.)

Run: .venv/bin/pytest -q tests/unit/test_plan_state.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from torch.distributed.tensor import DTensor

from moeyard.job.compose import compose
from moeyard.parallel.data_parallel import is_expert_param
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
    # ZeRO: zero1's moments on each rank's dp (experts: edp) slices, the first (largest) where rows do not
    # divide (6 heads of 10: a tp shard of 30 rows over dp 4); zero2 counted as FSDP; bf16 parameters.
    (["model=debug", "model.n_heads=6", "model.n_kv_heads=6"], dict(tp=2, pp=1, ep=2, dp=4, dp_mode="zero1"), 8),
    (["model=debug"], dict(tp=2, pp=1, ep=4, dp=2, dp_mode="zero2"), 4),
    (["model=debug", "train.dtype=bf16"], dict(tp=1, pp=2, ep=2, dp=2, dp_mode="zero1", param_dtype="bf16"), 4),
    (["model=mixtral_8x7b"], dict(tp=2, pp=4, ep=8, dp=4, dp_mode="zero1", param_dtype="bf16"), 32),
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
            want = rank_memory(pm, bf16=True, pcfg=pcfg)
            element = {p.element_size() for _, p in pm.named_parameters()}
            owned = sum(_first_slice(n, p, dims) for n, p in pm.named_parameters())
        got = stage_memory(probe, cfg.model, pcfg, dims, pp_rank, bf16=True)
        assert (got.params, got.tensors) == (want.params, want.tensors), (pp_rank, got, want)
        gathered = lambda m: (m.gathered_root, m.gathered_block, m.gathered_blocks)  # noqa: E731
        assert gathered(got) == gathered(want), pp_rank
        assert (got.optimizer_params, got.param_bytes) == (want.optimizer_params, want.param_bytes), pp_rank
        assert element == {want.param_bytes}, element  # the built parameters' own dtype
        if pcfg.dp_mode != "zero1":
            owned = want.params
        assert owned < want.params or pcfg.dp_mode != "zero1"
        master = 4 if pcfg.param_dtype == "bf16" else 0
        # parameter + gradient per local element, two moments (and a bf16 parameter's master) per owned one
        assert got.state_bytes == 2 * want.param_bytes * want.params + (8 + master) * owned + 4 * want.tensors


def _first_slice(name: str, param, dims: ParallelDims) -> int:
    """Elements of the first dp (experts: edp) rank's torch.chunk slice of a local tensor, as zero1 splits it:
    along dim 0, or dim 1 where there are fewer rows than ranks."""
    local = param.to_local() if isinstance(param, DTensor) else param
    ways = dims.edp if is_expert_param(name) else dims.dp
    dim = 1 if local.shape[0] < ways and local.ndim > 1 and local.shape[1] % ways == 0 else 0
    return local.chunk(ways, dim)[0].numel()
