"""The activation formulas (launch/plan/activations.py) against what autograd really saves, on CPU in fp32.

One forward and loss of a small model runs under torch's saved-tensor hooks; every saved tensor is counted
once per storage (views share it), parameters and buffers excluded, and attributed to the embedding, to a
block, or to the head (final norm, output projection, loss) by module hooks. Each part must equal the
formula's bytes, up to a few per-expert and per-sequence vectors the formulas leave out (the balancing
losses' [E] and [sequences, E] statistics, grouped_mm's [E] offsets). Variants: grouped-query attention with
a dense block, MoE with a shared expert and softmax routing; per-head q/k norm, a head-dim override and
sigmoid group-limited routing; full-width q/k norm with q/k/v biases; MLA with and without the query
bottleneck (on CPU its attention runs SDPA's math path, saving the S x S probabilities) with expert-choice
routing. When the model code changes what it saves, this test names the part that moved. The formulas model
both paths: autograd's own graph (compiled and on accelerators; the CPU-only hand-written backwards of the
experts, moe/experts.py `SwiGLUGroupedMM`, and of the combine, moe/combine.py, switched off) and uncompiled
CPU with them (`Shape.cpu_eager`: they keep x, gate and up, and y without y * w).

Run: .venv/bin/pytest -q tests/unit/test_plan_activations.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeyard.moe import combine
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.experts import GroupedExperts
from moeyard.moe.model import Transformer, init_weights
from moeyard.plan.activations import Shape, block_bytes, embedding_bytes, head_bytes

BASE = dict(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_hidden=80, vocab_size=200, max_seq_len=64)
MLA = dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6)
VARIANTS = {
    "gqa, dense + moe, shared expert": (dict(first_dense_layers=1), dict(num_shared_experts=1)),
    "qk-norm head, sigmoid groups": (
        dict(qk_norm="head", head_dim_override=10),
        dict(router="sigmoid_topk", n_groups=2, topk_groups=1),
    ),
    "qk-norm full, qkv bias": (dict(qk_norm="full", qkv_bias=True), {}),
    "mla with q bottleneck, expert choice": (
        dict(MLA, q_lora_rank=24),
        dict(router="expert_choice", capacity_factor=1.0),
    ),
    "mla without q bottleneck": (dict(MLA, q_lora_rank=0, first_dense_layers=1), {}),
}
ROWS, SEQ = 2, 16


def saved_by_part(model: Transformer, tokens: torch.Tensor) -> dict[str, int]:
    """Bytes autograd saves for one forward and loss, per part (embedding, block id, head)."""
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    path = ["head"]

    def enter(name: str):
        return lambda _module, _args: path.append(name)  # returns None: the input is left alone

    def leave(_module, _args, _output) -> None:
        path.pop()

    for name, module in [("embedding", model.tok_embeddings), *model.layers.items(), ("head", model.norm)]:
        module.register_forward_pre_hook(enter(name))
        module.register_forward_hook(leave)
    seen: set[int] = set()
    parts: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen and storage.data_ptr() not in owned:
            seen.add(storage.data_ptr())
            parts[path[-1]] = parts.get(path[-1], 0) + storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    return parts


@pytest.mark.parametrize("path", ["autograd", "cpu eager"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_formulas_equal_saved_tensors(variant, path, monkeypatch):
    if path == "autograd":  # what compiled graphs and accelerators save
        monkeypatch.setattr(GroupedExperts, "_hand_backward", lambda self, x: False)
        monkeypatch.setattr(combine, "_hand_written", lambda y_ND: False)
    model_kw, moe_kw = VARIANTS[variant]
    m = ModelConfig(**{**BASE, **model_kw})
    e = MoEConfig(**{**dict(num_experts=6, top_k=2, expert_hidden=40), **moe_kw})
    model = Transformer(m, e)
    init_weights(model, seed=0)
    tokens = torch.randint(0, m.vocab_size, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))
    measured = saved_by_part(model, tokens)
    shape = Shape(rows=ROWS, seq=SEQ, math_attention=True, cpu_eager=path == "cpu eager")
    slack = 4 * e.num_experts * (ROWS + 4) + 64  # per-expert and per-sequence vectors the formulas omit
    want = {"embedding": embedding_bytes(shape), "head": head_bytes(m, shape)}
    want.update({str(i): sum(block_bytes(m, e, shape, m.is_moe_layer(i)).values()) for i in range(m.n_layers)})
    for part, expected in want.items():
        got = measured[part]
        tolerance = slack if part.isdigit() and m.is_moe_layer(int(part)) else 16
        assert abs(got - expected) <= tolerance, f"{variant}: part {part}: saved {got} B, formula {expected} B"
