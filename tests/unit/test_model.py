"""The transformer: MoE placement knobs, tied embeddings, grouped-query attention, RoPE, causality, init, and
the parameter counts of the published-model presets (attention variants: tests/unit/test_attention.py).

Run: `.venv/bin/pytest -q tests/unit/test_model.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moeyard.job.compose import compose
from moeyard.moe.attention import Attention, apply_rope, rope_table
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.layer import MoELayer, SwiGLU
from moeyard.moe.model import Transformer, init_full_tensor, init_weights

SMALL = {"vocab_size": 64, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 48}
SMALL_MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=16)


def build(seed: int = 0, moe: MoEConfig = SMALL_MOE, **kw) -> Transformer:
    model = Transformer(ModelConfig(**{**SMALL, **kw}), moe)
    init_weights(model, seed)
    return model


@pytest.mark.parametrize(
    "n_layers, first_dense, every, moe_ids",
    [(4, 0, 1, [0, 1, 2, 3]), (6, 2, 2, [2, 4]), (5, 1, 3, [1, 4]), (3, 3, 1, [])],
)
def test_moe_placement_knobs(n_layers, first_dense, every, moe_ids):
    model = build(n_layers=n_layers, first_dense_layers=first_dense, moe_every=every)
    for lid, block in model.layers.items():
        is_moe = int(lid) in moe_ids
        assert isinstance(block.moe, MoELayer) == is_moe
        assert isinstance(block.feed_forward, SwiGLU) != is_moe
    assert sorted(int(lid) for lid in model.moe_layers()) == moe_ids


def test_tied_embeddings_share_one_tensor():
    model = build(tie_embeddings=True)
    assert model.output.weight is model.tok_embeddings.weight
    names = [n for n, _ in model.named_parameters()]
    assert "tok_embeddings.weight" in names and "output.weight" not in names
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 64, (2, 8))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    opt.step()
    assert model.output.weight is model.tok_embeddings.weight
    untied = build(tie_embeddings=False)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(untied) - count(model) == 64 * 32


def test_gqa_shapes_and_reference_attention():
    cfg = ModelConfig(**SMALL)  # 4 query heads share 2 kv heads, head dim 8
    torch.manual_seed(0)
    attn = Attention(cfg)
    assert attn.wq.weight.shape == (32, 32) and attn.wk.weight.shape == (16, 32)
    assert attn.wv.weight.shape == (16, 32) and attn.wo.weight.shape == (32, 32)
    B, S, H, KV, Hd = 2, 6, 4, 2, 8
    x = torch.randn(B, S, 32)
    rope = rope_table(Hd, 16, 10000.0)
    out = attn(x, rope)
    assert out.shape == (B, S, 32)
    # Reference: repeat each kv head for its H/KV query heads, causal softmax attention written out.
    q = apply_rope(attn.wq(x).view(B, S, H, Hd), rope).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(B, S, KV, Hd), rope).repeat_interleave(H // KV, dim=2).transpose(1, 2)
    v = attn.wv(x).view(B, S, KV, Hd).repeat_interleave(H // KV, dim=2).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(Hd)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, 32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_rope_rotates_pairs_and_preserves_norms():
    table = rope_table(head_dim=2, max_seq_len=4, theta=10000.0)  # one pair, angle = position
    x = torch.tensor([1.0, 0.0]).expand(1, 4, 1, 2)
    out = apply_rope(x, table)[0, :, 0]
    expected = [[math.cos(p), math.sin(p)] for p in range(4)]
    torch.testing.assert_close(out, torch.tensor(expected))

    x = torch.randn(2, 16, 3, 8)
    table = rope_table(8, 16, 10000.0)
    out = apply_rope(x, table)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(out[:, 0], x[:, 0])  # position 0 is not rotated
    # Scores depend on relative position only: <q at m, k at n> is the same for (3, 1) and (7, 5).
    q, k = torch.randn(8), torch.randn(8)
    rq = apply_rope(q.expand(1, 16, 1, 8), table)[0, :, 0]
    rk = apply_rope(k.expand(1, 16, 1, 8), table)[0, :, 0]
    assert (rq[3] @ rk[1]).item() == pytest.approx((rq[7] @ rk[5]).item(), rel=1e-5)


def test_future_tokens_do_not_change_past_logits():
    model = build(n_layers=3, first_dense_layers=1)
    tokens = torch.randint(0, 64, (2, 12))
    full = model(tokens)
    assert full.shape == (2, 12, 64)
    for cut in (1, 5, 11):
        torch.testing.assert_close(model(tokens[:, :cut]), full[:, :cut], rtol=1e-5, atol=1e-6)
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 64
    torch.testing.assert_close(model(changed)[:, :6], full[:, :6], rtol=1e-5, atol=1e-6)


def test_init_is_seeded_per_name_and_scales_residual_outputs():
    cfg = ModelConfig(**SMALL)
    a = init_full_tensor("layers.0.moe.experts.w1", (4, 32, 16), cfg, seed=7)
    assert torch.equal(a, init_full_tensor("layers.0.moe.experts.w1", (4, 32, 16), cfg, seed=7))
    assert not torch.equal(a, init_full_tensor("layers.1.moe.experts.w1", (4, 32, 16), cfg, seed=7))
    assert not torch.equal(a, init_full_tensor("layers.0.moe.experts.w1", (4, 32, 16), cfg, seed=8))
    # Residual-branch outputs (attention wo, dense and expert w2) get std / sqrt(2 * n_layers).
    shape = (64, 32, 32)
    for name in (
        "layers.0.moe.experts.w2",
        "layers.1.feed_forward.w2.weight",
        "layers.0.attention.wo.weight",
    ):
        std = init_full_tensor(name, shape, cfg, seed=0).std().item()
        assert std == pytest.approx(0.02 / math.sqrt(4), rel=0.02), name
    assert init_full_tensor("layers.0.moe.experts.w3", shape, cfg, 0).std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(init_full_tensor("layers.0.ffn_norm.weight", (32,), cfg, 0), torch.ones(32))


def test_init_weights_is_reproducible_and_zeroes_bias():
    a, b = build(seed=3), build(seed=3)
    a.layers["0"].moe.router.expert_bias.fill_(1.0)
    init_weights(a, 3)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert a.layers["0"].moe.router.expert_bias.abs().sum() == 0


PUBLISHED = {
    # preset: (total, active) in billions as published, and each figure's last digit (the tolerance unit).
    # DeepSeek-V3: 671 B main model, 37 B activated; the Hugging Face checkpoint's 685 B adds the
    # multi-token-prediction module (model.mtp_layers=1: tests/unit/test_mtp.py). Qwen3-30B-A3B: 30.5 B,
    # 3.3 B activated.
    # OLMoE-1B-7B: 6.9 B, 1.3 B active. Mixtral-8x7B: 46.7 B, 12.9 B active.
    "deepseek_v3": (671.0, 37.0, 1.0),
    "qwen3_30b_a3b": (30.5, 3.3, 0.1),
    "olmoe_1b_7b": (6.9, 1.3, 0.1),
    "mixtral_8x7b": (46.7, 12.9, 0.1),
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_presets_have_the_published_parameter_counts(preset):
    """On the meta device: the total rounds to the published figure (within half its last digit); the active
    count (embeddings, attention, dense blocks, router, shared and top-k routed experts) is within one unit of
    its last digit (published active counts are truncated: DeepSeek-V3 has 37.55 B)."""
    cfg = compose([f"model={preset}"])
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    total = sum(p.numel() for p in model.parameters())
    e = cfg.moe
    idle_experts = len(model.moe_layers()) * (e.num_experts - e.top_k) * 3 * cfg.model.dim * e.expert_hidden
    want_total, want_active, unit = PUBLISHED[preset]
    assert abs(total / 1e9 - want_total) <= unit / 2, total
    assert abs((total - idle_experts) / 1e9 - want_active) <= unit, total - idle_experts
