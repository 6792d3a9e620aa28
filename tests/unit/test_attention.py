"""Attention variants of moe/attention.py against references, in fp32 on small random inputs:

- MLA (with and without the query bottleneck) against its formula written out, score = q_nope . k_nope +
  rope(q_rope) . rope(shared k_rope), scaled by 1/sqrt(N + R);
- per-head and full-width q/k RMSNorm and q/k/v biases against grouped-query attention written out;
- parity with Hugging Face transformers' own modules on random weights (1e-5): DeepseekV3Attention (both
  RoPE layouts, with and without q_lora_rank), Qwen3MoeAttention (per-head q/k norm, head_dim != D / H),
  OlmoeAttention (full-width q/k norm) and Qwen2MoeAttention (q/k/v biases). Weights are copied with the
  mapping each module's docstring states, which is what a Hugging Face importer must do;
- initial values (norms 1, biases 0) and the config rules.

Run: `.venv/bin/pytest -q tests/unit/test_attention.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DeepseekV3Config, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
from transformers.models.olmoe.modeling_olmoe import OlmoeAttention, OlmoeRotaryEmbedding
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention, Qwen2MoeRotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding

from moeyard.moe.attention import MLA, Attention, apply_rope, rope_table
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.model import Transformer, init_weights

B, S, D, H = 2, 7, 32, 4
MLA_SHAPE = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6)
"""L=16, R=4, N=8, Vd=6: every width differs, so a swapped split fails."""


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 64, "dim": D, "n_heads": H, "n_kv_heads": 2, "norm_eps": 1e-6, **kw})


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Normal weights everywhere, norm weights around 1 (so a misplaced one shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name else 0.3) + ("norm" in name))
    return module


def rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w


def causal_attention(q_BHSd: torch.Tensor, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out, scaled by 1/sqrt(q head dim) -> [B, S, H * Vd]."""
    scores = q_BHSd @ k_BHSd.transpose(-1, -2) / math.sqrt(q_BHSd.shape[-1])
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v_BHSd).transpose(1, 2).flatten(2)


def pairs_from_half(w: torch.Tensor, width: int) -> torch.Tensor:
    """Each `width` block of dim 0 from HF's rotate_half layout (i, i + width/2) to ours (2i, 2i+1)."""
    return w.reshape(-1, 2, width // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --- against the formulas ------------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_mla_matches_its_formula(q_lora_rank):
    cfg = model_cfg(attention="mla", q_lora_rank=q_lora_rank, **MLA_SHAPE)
    attn = randomize_(MLA(cfg))
    L, R, N, Vd = 16, 4, 8, 6
    assert attn.wkv_a.weight.shape == (L + R, D) and attn.wkv_b.weight.shape == (H * (N + Vd), L)
    assert attn.wo.weight.shape == (D, H * Vd)
    if q_lora_rank:
        assert attn.wq is None and attn.wq_b.weight.shape == (H * (N + R), 12) and attn.q_a_norm.weight.shape == (12,)
    else:
        assert attn.wq_a is None and attn.wq.weight.shape == (H * (N + R), D)
    x, rope = torch.randn(B, S, D), rope_table(R, S, 10000.0)
    with torch.no_grad():
        out = attn(x, rope)
        if q_lora_rank:
            q = rms(x @ attn.wq_a.weight.T, attn.q_a_norm.weight) @ attn.wq_b.weight.T
        else:
            q = x @ attn.wq.weight.T
        q = q.view(B, S, H, N + R)
        down = x @ attn.wkv_a.weight.T  # [latent | one rotary key for all heads]
        kv = (rms(down[..., :L], attn.kv_a_norm.weight) @ attn.wkv_b.weight.T).view(B, S, H, N + Vd)
        q_rope = apply_rope(q[..., N:], rope)  # [B, S, H, R]
        k_rope = apply_rope(down[..., None, L:], rope)[:, :, 0]  # [B, S, R]
        scores = torch.einsum("bshn,bthn->bhst", q[..., :N], kv[..., :N])
        scores = scores + torch.einsum("bshr,btr->bhst", q_rope, k_rope)
        scores = (scores / math.sqrt(N + R)).masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        ref = torch.einsum("bhst,bthv->bshv", scores.softmax(-1), kv[..., N:]).flatten(2) @ attn.wo.weight.T
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_qk_norms_and_biases_match_gqa_written_out(qk_norm, qkv_bias):
    hd, G = 12, 2  # head_dim_override: H * hd = 48 != D
    cfg = model_cfg(qk_norm=qk_norm, qkv_bias=qkv_bias, head_dim_override=hd)
    attn = randomize_(Attention(cfg))
    assert attn.wq.weight.shape == (H * hd, D) and attn.wo.weight.shape == (D, H * hd)
    assert (attn.wq.bias is not None) == qkv_bias and (attn.wv.bias is not None) == qkv_bias
    assert attn.wo.bias is None
    x, rope = torch.randn(B, S, D), rope_table(hd, S, 10000.0)
    with torch.no_grad():
        q, k, v = attn.wq(x), attn.wk(x), attn.wv(x)  # nn.Linear: x @ w.T + b
        if qk_norm == "full":  # one RMS over all heads' channels
            q, k = rms(q, attn.q_norm.weight), rms(k, attn.k_norm.weight)
        q, k, v = q.view(B, S, H, hd), k.view(B, S, G, hd), v.view(B, S, G, hd)
        if qk_norm == "head":  # one RMS per head, one weight shared by the heads
            q, k = rms(q, attn.q_head_norm.weight), rms(k, attn.k_head_norm.weight)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        k, v = (t.repeat_interleave(H // G, dim=2).transpose(1, 2) for t in (k, v))
        ref = causal_attention(q.transpose(1, 2), k, v) @ attn.wo.weight.T
        torch.testing.assert_close(attn(x, rope), ref, rtol=1e-5, atol=1e-5)


# --- against Hugging Face transformers ----------------------------------------------------------------


def hf_forward(attn: torch.nn.Module, rotary: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's attention on `x` with its own rotary embedding and an explicit causal mask (eager kernel)."""
    attn.config._attn_implementation = "eager"
    cos_sin = rotary(x, torch.arange(S)[None])
    mask = torch.full((S, S), float("-inf")).triu(1)[None, None]
    return attn(x, cos_sin, attention_mask=mask)[0]


@pytest.mark.parametrize("rope_interleave", [True, False])
@pytest.mark.parametrize("q_lora_rank", [0, 12])
def test_mla_matches_deepseek_v3_attention(q_lora_rank, rope_interleave):
    L, R, N = 16, 4, 8
    hf_cfg = DeepseekV3Config(
        hidden_size=D,
        num_attention_heads=H,
        num_key_value_heads=H,
        q_lora_rank=q_lora_rank or None,
        max_position_embeddings=S,
        rms_norm_eps=1e-6,
        rope_interleave=rope_interleave,
        **MLA_SHAPE,
    )
    hf = randomize_(DeepseekV3Attention(hf_cfg, layer_idx=0), seed=1)
    ours = MLA(model_cfg(attention="mla", q_lora_rank=q_lora_rank, **MLA_SHAPE))
    names = {"wkv_a": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
    names |= {"wq_a": "q_a_proj", "q_a_norm": "q_a_layernorm", "wq_b": "q_b_proj"} if q_lora_rank else {"wq": "q_proj"}
    state = {f"{ours_}.weight": hf.get_submodule(theirs).weight.detach().clone() for ours_, theirs in names.items()}
    if not rope_interleave:  # HF rotates (i, i + R/2) of the rotary channels: move them into our pairs
        wq = state["wq_b.weight" if q_lora_rank else "wq.weight"].view(H, N + R, -1)
        wq[:, N:] = pairs_from_half(wq[:, N:].reshape(H * R, -1), R).view(H, R, -1)
        state["wkv_a.weight"][L:] = pairs_from_half(state["wkv_a.weight"][L:], R)
    ours.load_state_dict(state)
    x = torch.randn(B, S, D)
    with torch.no_grad():
        want = hf_forward(hf, DeepseekV3RotaryEmbedding(hf_cfg), x)
        torch.testing.assert_close(ours(x, rope_table(R, S, 10000.0)), want, rtol=1e-5, atol=1e-5)


def gqa_state_from_hf(hf: torch.nn.Module, hd: int, norms: dict[str, str]) -> dict[str, torch.Tensor]:
    """Our GQA state from an HF attention: projections (and biases) by name, q/k rows and norm weights moved
    from HF's rotate_half layout into our pairs within each head."""
    state = {}
    for ours, theirs in {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}.items():
        for kind, t in hf.get_submodule(theirs).named_parameters():
            state[f"{ours}.{kind}"] = pairs_from_half(t.detach(), hd) if ours in ("wq", "wk") else t.detach()
    for ours, theirs in norms.items():
        state[f"{ours}.weight"] = pairs_from_half(hf.get_submodule(theirs).weight.detach(), hd)
    return state


GQA_FAMILIES = {
    # name: (HF config class, attention, rotary, our qk_norm, our norm -> HF norm, extra HF / our config)
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeAttention,
        Qwen3MoeRotaryEmbedding,
        {"q_head_norm": "q_norm", "k_head_norm": "k_norm"},
        {"head_dim": 12},
        {"qk_norm": "head", "head_dim_override": 12},
    ),
    "olmoe": (
        OlmoeConfig,
        OlmoeAttention,
        OlmoeRotaryEmbedding,
        {"q_norm": "q_norm", "k_norm": "k_norm"},
        {"rms_norm_eps": 1e-6},
        {"qk_norm": "full"},
    ),
    "qwen2_moe": (
        Qwen2MoeConfig,
        Qwen2MoeAttention,
        Qwen2MoeRotaryEmbedding,
        {},
        {"qkv_bias": True},
        {"qkv_bias": True},
    ),
}


@pytest.mark.parametrize("family", list(GQA_FAMILIES))
def test_gqa_variants_match_hf(family):
    config_cls, attention_cls, rotary_cls, norms, hf_extra, ours_extra = GQA_FAMILIES[family]
    hf_cfg = config_cls(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=2, max_position_embeddings=S, **hf_extra
    )
    hf = randomize_(attention_cls(hf_cfg, layer_idx=0), seed=2)
    cfg = model_cfg(**ours_extra)
    ours = Attention(cfg)
    ours.load_state_dict(gqa_state_from_hf(hf, cfg.head_dim, norms))
    x = torch.randn(B, S, D)
    with torch.no_grad():
        want = hf_forward(hf, rotary_cls(hf_cfg), x)
        torch.testing.assert_close(ours(x, rope_table(cfg.head_dim, S, 10000.0)), want, rtol=1e-5, atol=1e-5)


# --- initial values and rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"attention": "mla", "q_lora_rank": 12, **MLA_SHAPE},
        {"qk_norm": "head", "qkv_bias": True},
        {"qk_norm": "full"},
    ],
)
def test_init_fills_norms_with_ones_and_biases_with_zeros(kw):
    model = Transformer(model_cfg(n_layers=1, **kw), MoEConfig(num_experts=2, top_k=1, expert_hidden=8))
    init_weights(model, seed=0)
    for name, p in model.layers["0"].attention.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.3), name
    assert model.rope.shape == (model.cfg.max_seq_len, model.cfg.rope_dim // 2, 2)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"head_dim_override": 7}, "model.head_dim_override=7 must be even"),
        ({"attention": "mla", "qk_norm": "head"}, "model.qk_norm=head must be none with model.attention=mla"),
        ({"attention": "mla", "qkv_bias": True}, "model.qkv_bias=True must be false with model.attention=mla"),
        ({"attention": "mla", "kv_lora_rank": 0}, "model.kv_lora_rank=0 must be >= 1"),
        ({"attention": "mla", "qk_rope_head_dim": 3}, "model.qk_rope_head_dim=3 must be even"),
        ({"attention": "mla", "q_lora_rank": -1}, "model.q_lora_rank=-1 must be >= 0"),
        ({"rope_scaling": "yarn", "yarn_factor": 0.5}, "model.yarn_factor=0.5 must be >= 1"),
        ({"rope_scaling": "yarn", "yarn_beta_slow": 40.0}, "model.yarn_beta_fast=32.0 must be >= yarn_beta_slow"),
    ],
)
def test_bad_attention_configs_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        model_cfg(**kw).check_attention()
    with pytest.raises(ValueError, match=message):
        Transformer(model_cfg(**kw), MoEConfig())
