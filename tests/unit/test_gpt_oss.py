"""gpt-oss: its features in the model and its Hugging Face family, on CPU in fp32 with no hub access.

Features, each against a hand-written reference: attention sinks (a per-head logit in every softmax's
denominator), sliding-window blocks (query i sees keys i - W < j <= i), and the clamped SwiGLU with expert
biases. Interop: a tiny random transformers `GptOssForCausalLM` (sinks, q/k/v/o biases, every other block
sliding with a window shorter than the sequence, YaRN without truncation, biased router, fused interleaved
experts with biases) imports with transformers' logits to 1e-4; two trained steps later the export loads in
transformers with nothing missing and our logits. Its experts quantised to MXFP4 as OpenAI publishes them
import equal to transformers' own dequantisation of the same bytes. The presets count the published totals.

Run: .venv/bin/pytest -q tests/unit/test_gpt_oss.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GptOssConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moeyard.interop import mxfp4
from moeyard.interop.hf import check_exportable, export, hydra_overrides, read_hf_config
from moeyard.job.compose import compose
from moeyard.moe.attention import attend
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.experts import GroupedExperts
from moeyard.moe.masking import sliding_window_mask
from moeyard.moe.model import Transformer
from tests.helpers import make_trainer
from tests.unit.test_hf_families import COMMON, RUN, import_overrides, logits_diff, randomize_

TINY = dict(
    COMMON,
    intermediate_size=32,
    num_local_experts=8,
    head_dim=16,
    sliding_window=8,  # shorter than train.seq_len=32: the sliding blocks see less than the full ones
    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                     "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 32},
)  # fmt: skip


def reference_attention(q, k, v, sinks, window):
    """Plain softmax over [scores | sink] with the sink dropped, causal within `window` ([B, H, S, d])."""
    S = q.shape[2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    scores = scores.masked_fill((j > i) | (i - j >= window), float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs @ v


def test_sinks_and_sliding_window_match_the_softmax_they_define() -> None:
    """Exact to fp32 rounding, with GQA (4 heads over 2 kv heads); the sinks receive a gradient."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 10, 4, 8), torch.randn(2, 10, 2, 8), torch.randn(2, 10, 2, 8)
    sinks = torch.randn(4, requires_grad=True)
    mask = sliding_window_mask(None, 10, 3, q.device)
    ours = attend(q, k, v, mask, sinks_H=sinks).transpose(1, 2)
    rep = lambda t: t.transpose(1, 2).repeat_interleave(2, dim=1)  # noqa: E731
    want = reference_attention(q.transpose(1, 2), rep(k), rep(v), sinks, 3)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-5)
    ours.sum().backward()
    assert sinks.grad.abs().min() > 0


def test_clamped_swiglu_experts_with_biases() -> None:
    """Two experts, rows sorted by expert: each row is (clamp(u) + 1) * g' sigmoid(1.702 g') W2 + b2 with its
    own expert's weights and biases; the clamps bite (inputs large enough to pass the limit)."""
    torch.manual_seed(0)
    experts = GroupedExperts(2, 8, 4, "off", biases=True, clamp=(1.702, 7.0))
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=2.0)
    x = 3 * torch.randn(5, 8)
    counts = torch.tensor([2, 3])
    out = experts(x, counts)
    clamped = 0
    for row, e in enumerate([0, 0, 1, 1, 1]):
        g = x[row] @ experts.w1[e] + experts.b1[e]
        u = x[row] @ experts.w3[e] + experts.b3[e]
        clamped += int((g > 7).sum() + (u.abs() > 7).sum())
        gc = g.clamp(max=7.0)
        h = (u.clamp(-7, 7) + 1) * gc * torch.sigmoid(1.702 * gc)
        torch.testing.assert_close(out[row], h @ experts.w2[e] + experts.b2[e], atol=1e-4, rtol=1e-5)
    assert clamped > 0


def save_tiny(out: Path) -> torch.nn.Module:
    """A random tiny gpt-oss, saved by save_pretrained (its experts fused on disk). Eager attention: the
    reference softmax with sinks."""
    torch.manual_seed(0)
    config = GptOssConfig(**TINY)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    randomize_(model).eval()
    model.save_pretrained(out)
    return model


def test_import_then_export_match_transformers(tmp_path: Path) -> None:
    theirs = save_tiny(tmp_path / "hf")
    run = tmp_path / "run"
    trainer = make_trainer(compose([*import_overrides(tmp_path / "hf"), *RUN, "checkpoint.enabled=true",
                                    f"run.dir={run}"]))  # fmt: skip
    m = trainer.cfg.model
    assert (m.attention_sinks, m.sliding_window, m.sliding_layers, m.yarn_truncate) == (True, 8, "even", False)
    imported = logits_diff(trainer, theirs)
    assert imported <= 1e-4, imported

    trainer.fit()
    export(run, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "gpt_oss"
    back, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    exported = logits_diff(trainer, back.eval())
    assert exported <= 1e-4, exported
    assert logits_diff(trainer, theirs) > 1e-3  # the steps moved the weights
    print(f"gpt_oss: max |logit diff| import {imported:.2e}, export {exported:.2e}")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(attention_sinks=True, attn_impl="flex"), "model.attn_impl=flex must not be flex with model.attention"),
        (dict(sliding_window=-1), "model.sliding_window=-1 must be >= 0"),
        (dict(attention="mla", attention_sinks=True), "model.attention_sinks=True must be false with model.attention"),
        (dict(attention="mla", sliding_window=4), "model.sliding_window=4 must be 0 with model.attention=mla"),
    ],
)
def test_bad_attention_fields_are_refused_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**fields).check()


def test_export_refuses_what_gpt_oss_cannot_represent() -> None:
    """One attention_bias covers q/k/v and o; HF's router always has its bias."""
    gpt_oss = dict(router_bias=True, expert_biases=True, activation="clamped_swiglu")
    with pytest.raises(ValueError, match=re.escape("model.o_bias=False has no Hugging Face gpt-oss equivalent")):
        check_exportable(ModelConfig(attention_sinks=True, qkv_bias=True), MoEConfig(**gpt_oss))
    with pytest.raises(ValueError, match=re.escape("moe.router_bias=False has no Hugging Face gpt-oss")):
        check_exportable(ModelConfig(attention_sinks=True), MoEConfig(**{**gpt_oss, "router_bias": False}))


GPT_OSS = {"gpt_oss_20b": dict(layers=24, E=32), "gpt_oss_120b": dict(layers=36, E=128)}
PUBLISHED_TOTAL = {"gpt_oss_20b": 20.9, "gpt_oss_120b": 116.8}  # billions, OpenAI's gpt-oss model card


def by_hand(layers: int, E: int, V=201088, D=2880, H=64, G=8, hd=64, F=2880) -> int:
    """From the published config.json fields: attention with q/k/v/o biases and one sink per head, a router
    [E, D] with its bias, E experts of three [D, F] matrices with biases (2F + D), two norms a block, the
    final norm, an untied embedding and head."""
    attention = D * H * hd + H * hd + 2 * (D * G * hd + G * hd) + H * hd * D + D + H
    moe = E * D + E + E * (3 * D * F + 2 * F + D)
    return layers * (attention + moe + 2 * D) + D + 2 * V * D


@pytest.mark.parametrize("preset", list(GPT_OSS))
def test_gpt_oss_presets_count_the_published_parameters(preset: str) -> None:
    cfg = compose([f"model={preset}"])
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    total = sum(p.numel() for p in model.parameters())
    assert total == by_hand(**GPT_OSS[preset])
    assert round(total / 1e9, 1) == PUBLISHED_TOTAL[preset]
    assert check_exportable(cfg.model, cfg.moe).title == "gpt-oss"


def published_20b() -> dict:
    """gpt-oss-20b's published config.json (its experts MXFP4, the rest bf16)."""
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True, "head_dim": 64,
        "hidden_act": "silu", "hidden_size": 2880, "intermediate_size": 2880, "initial_context_length": 4096,
        "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
        "num_attention_heads": 64, "num_experts_per_tok": 4, "experts_per_token": 4, "num_hidden_layers": 24,
        "num_key_value_heads": 8, "num_local_experts": 32, "rms_norm_eps": 1e-05, "rope_theta": 150000,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                         "rope_type": "yarn", "truncate": False},
        "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
        "vocab_size": 201088, "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
    }  # fmt: skip


def test_published_config_translates(tmp_path: Path) -> None:
    """gpt-oss-20b's config.json gives the gpt_oss_20b preset's model and expert shapes."""
    (tmp_path / "config.json").write_text(json.dumps(published_20b()))
    cfg = compose(hydra_overrides(read_hf_config(tmp_path, "import")))
    preset = compose(["model=gpt_oss_20b"])
    assert {**vars(cfg.model), "name": "gpt_oss_20b"} == vars(preset.model)
    shape = ("num_experts", "top_k", "expert_hidden", "router_bias", "expert_biases", "activation", "swiglu_limit")
    assert {k: getattr(cfg.moe, k) for k in shape} == {k: getattr(preset.moe, k) for k in shape}


def quantise_mxfp4(w_EOI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OCP MXFP4 of [E, out, in] (as the published checkpoints store it): per 32 elements along `in`, the
    shared exponent floor(log2(amax)) - 2 (e2m1's largest exponent) and each element the nearest e2m1 value
    (saturating at +-6). -> blocks uint8 [E, out, in/32, 16] (low nibble the even element), scales uint8."""
    groups = w_EOI.unflatten(-1, (-1, mxfp4.GROUP))
    exp = groups.abs().amax(-1).clamp(min=2.0**-100).log2().floor() - 2
    lut = torch.tensor(mxfp4.E2M1)
    codes = ((groups / exp.exp2()[..., None])[..., None] - lut).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def test_mxfp4_box_reads_only_its_groups() -> None:
    """A box starting and ending inside 32-element groups equals the same box of the whole dequantised weight."""
    torch.manual_seed(0)
    blocks, scales = quantise_mxfp4(torch.randn(3, 8, 96))
    whole_EIO = mxfp4.dequantize(blocks, scales).transpose(1, 2)
    box = (slice(1, 3), slice(5, 70), slice(2, 7))
    assert torch.equal(mxfp4.read_box(blocks, scales, box), whole_EIO[box])


def test_mxfp4_experts_import_as_transformers_dequantises_them(tmp_path: Path) -> None:
    """A tiny gpt-oss whose experts are stored as MXFP4 blocks and scales (config.json's quantization_config
    mxfp4) imports with experts equal to transformers' dequantisation of the same bytes, and with the logits of
    the transformers model holding those dequantised weights (1e-4)."""
    theirs = save_tiny(tmp_path / "plain")
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    reference = {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantise_mxfp4(tensors.pop(name).transpose(1, 2))  # stored [E, out, in]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        reference[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, in, out]
    hf_dir = tmp_path / "mxfp4"
    hf_dir.mkdir()
    save_file(tensors, str(hf_dir / "model.safetensors"))
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (hf_dir / "config.json").write_text(json.dumps(config))
    theirs.load_state_dict(reference, strict=False)  # transformers' model now holds the dequantised experts

    trainer = make_trainer(compose([*import_overrides(hf_dir), *RUN]))
    experts = trainer.pm.parts[0].layers["0"].moe.experts
    gate_up = reference["model.layers.0.mlp.experts.gate_up_proj"]
    assert torch.equal(experts.w1, gate_up[..., 0::2]) and torch.equal(experts.w3, gate_up[..., 1::2])
    assert torch.equal(experts.w2, reference["model.layers.0.mlp.experts.down_proj"])
    assert logits_diff(trainer, theirs) <= 1e-4
