"""The golden contract for the attention variants of moe/attention.py: each trains exactly like one process
under the layouts whose plans treat it specially, with its sharding in place.

- MLA (query bottleneck on) under tp2: wq_b/wkv_b column-parallel, wo row-parallel, the down-projections
  and latent norms replicated, and the shared rotary key's gradient summed over tp; under pp2 (1F1B).
- Full-width q/k norm (OLMoE) under tp2 with sequence parallelism: the norm weight sharded like wq/wk's rows,
  its mean of squares completed over tp.
- Per-head q/k norm with q/k/v biases and a head width != dim / n_heads (Qwen3 + Qwen2) under tp2: biases
  split with their rows, the shared norm weights replicated with tp-partial gradients.

Reuses tests/multiproc/test_golden.py: its debug-model BASE, single-process references, tolerances
(`tolerance`: EXACT unless the reference made decisions within rounding of a tie) and
`assert_layout_applied`, whose table of tensor-parallel dims learns the new weights here.

    .venv/bin/pytest -q tests/multiproc/test_golden_attention.py   # ~3 min on 2 idle cores
"""

from __future__ import annotations

from unittest import mock

import pytest

from tests.helpers import free_port, run_layout
from tests.multiproc import test_golden as golden

MLA = [
    "model.attention=mla",
    "model.q_lora_rank=32",
    "model.kv_lora_rank=24",
    "model.qk_rope_head_dim=8",
    "model.qk_nope_head_dim=8",
    "model.v_head_dim=12",
]
"""Every MLA width differs (Vd=12 != N+R=16), so a mixed-up split or a misplaced shard shows."""
QK_NORM_FULL = ["model.qk_norm=full"]
QK_NORM_HEAD_BIAS = ["model.qk_norm=head", "model.qkv_bias=true", "model.head_dim_override=24"]

LAYOUTS = [
    ("tp2-mla", 2, ["parallel.tp=2"], MLA),
    ("pp2-mla", 2, ["parallel.pp=2"], MLA),
    ("tp2-sp-qk-norm-full", 2, ["parallel.tp=2", "parallel.sequence_parallel=true"], QK_NORM_FULL),
    ("tp2-qk-norm-head-bias", 2, ["parallel.tp=2"], QK_NORM_HEAD_BIAS),
]

ATTENTION_TP_DIM = {
    "attention.wq.bias": 0,
    "attention.wk.bias": 0,
    "attention.wv.bias": 0,
    "attention.q_norm.weight": 0,  # full-width norms: sharded like wq/wk's rows
    "attention.k_norm.weight": 0,
    "attention.wq_b.weight": 0,
    "attention.wkv_b.weight": 0,
}
"""Tensor-parallel dims of the weights only these variants have (parallel/tensor.py's `_attention_plan`);
MLA's wq_a, wkv_a, latent norms and the per-head q/k norms stay whole, plain tensors on every rank."""


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("world", "layout", "variant"), [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_attention_variant_trains_like_one_process(world, layout, variant, tmp_path, tmp_path_factory):
    ref = golden.reference(variant, tmp_path_factory)
    overrides = [*golden.BASE, *variant, *layout, f"run.dir={tmp_path}"]
    got = run_layout(overrides, world, str(tmp_path / "got.pt"), free_port())
    with mock.patch.dict(golden._TP_DIM, ATTENTION_TP_DIM):
        golden.assert_layout_applied(overrides, world, got)
    golden.assert_same_training(ref, got)
