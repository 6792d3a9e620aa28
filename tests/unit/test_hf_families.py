"""Hugging Face interop per family (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3, OLMoE, GLM-4.5-MoE), on CPU in fp32
with no hub access: a tiny random model built in `transformers` from a local config is saved, `train.init_from`
reads it (with the overrides `moeyard import` derives from its config.json) and our logits equal transformers' to
1e-4; two training steps later `moeyard export` writes the same family, which transformers loads with nothing
missing and with our logits. Both on-disk expert layouts import: per-expert Linear weights (what save_pretrained
writes) and transformers 5's fused 3-D `gate_up_proj`/`down_proj`. Configs a family cannot represent are refused
both ways, naming the field; the published-model presets export as their family.

Run: .venv/bin/pytest -q tests/unit/test_hf_families.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Glm4MoeConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from moeyard.interop.hf import check_exportable, export, hydra_overrides, overrides_from_hf, read_hf_config
from moeyard.job.compose import compose
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.train.trainer import Trainer
from tests.helpers import make_trainer

COMMON = dict(
    vocab_size=256,  # the byte corpus
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    num_experts_per_tok=2,
)
TINY = {
    "mixtral": (MixtralConfig, dict(intermediate_size=32, num_local_experts=8)),
    # Block 0 dense (mlp_only_layers), a shared expert wider than a routed one, top-k not renormalised.
    "qwen2_moe": (
        Qwen2MoeConfig,
        dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
             mlp_only_layers=[0], norm_topk_prob=False),
    ),
    "qwen3_moe": (  # head_dim 24: 4 heads * 24 != hidden 64
        Qwen3MoeConfig,
        dict(intermediate_size=96, moe_intermediate_size=32, num_experts=8, head_dim=24, norm_topk_prob=True),
    ),
    "deepseek_v3": (  # MLA, block 0 dense, 4 groups of 2 experts (best 2 groups), scaled weights, biased choice
        DeepseekV3Config,
        dict(num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
             n_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
             q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12),
    ),
    "olmoe": (OlmoeConfig, dict(intermediate_size=32, num_experts=8, eos_token_id=0)),  # full q/k norm, no renorm
    "glm4_moe": (  # RoPE on the first 12 of 24 channels per head, q/k/v biases, q/k norm; routing as DeepSeek-V3
        Glm4MoeConfig,
        dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1, n_group=4,
             topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5, head_dim=24,
             partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True, num_mtp_layers=0),
    ),
}  # fmt: skip
RUN = ["data.max_files=20", "train.seq_len=32", "profiling=off", "train.eval_every=0", "train.steps=2"]


def hf_config(family: str, **changes):
    cls, extra = TINY[family]
    return cls(**{**COMMON, **extra, **changes})


def randomize_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Weights large enough that every tensor shows in the logits: norms near 1, projections ~0.1, router
    logits ~N(0, 64) so that top-k choices are far from ties, selection biases ~0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return model


def save_tiny(family: str, out: Path, fused: bool = False, **changes) -> torch.nn.Module:
    """A random tiny `family` model saved to `out`: per-expert weights (save_pretrained) or, with `fused`, the
    model's own state dict (transformers 5 holds experts as 3-D gate_up_proj/down_proj). Returns the model."""
    torch.manual_seed(0)
    model = randomize_(AutoModelForCausalLM.from_config(hf_config(family, **changes))).eval()
    if fused:
        out.mkdir(parents=True)
        model.config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    else:
        model.save_pretrained(out)
    return model


def import_overrides(hf_dir: Path) -> list[str]:
    """What `moeyard import HF_DIR` trains with: the derived shape and routing, then train.init_from."""
    return [*hydra_overrides(read_hf_config(hf_dir, "import")), f"train.init_from={hf_dir}"]


def tensor_names(hf_dir: Path) -> set[str]:
    names = set()
    for file in hf_dir.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


def logits_diff(trainer: Trainer, hf_model: torch.nn.Module) -> float:
    tokens, _ = trainer.data.batch(123, 4)
    with torch.no_grad():
        diff = (trainer.pm.parts[0](tokens) - hf_model(input_ids=tokens).logits).abs().max().item()
    for moe in trainer.pm.moe_layers().values():
        moe.drain_stats()  # the trainer counts one forward per micro-batch
    return diff


# --- both directions, per family ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(TINY))
def test_import_then_export_match_transformers(family: str, tmp_path: Path) -> None:
    """Per-expert safetensors import with transformers' logits; two trained steps export as the same family,
    which transformers loads completely and runs to our logits."""
    theirs = save_tiny(family, tmp_path / "hf")
    assert any(".experts.0." in name for name in tensor_names(tmp_path / "hf"))  # the per-expert layout
    run = tmp_path / "run"
    bias = (
        ["moe.bias_update_rate=0.01"] if family in ("deepseek_v3", "glm4_moe") else []
    )  # moves the exported selection bias
    trainer = make_trainer(
        compose([*import_overrides(tmp_path / "hf"), *RUN, *bias, "checkpoint.enabled=true", f"run.dir={run}"])
    )
    imported = logits_diff(trainer, theirs)
    assert imported <= 1e-4, imported

    trainer.fit()
    export(run, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == family
    back, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    exported = logits_diff(trainer, back.eval())
    assert exported <= 1e-4, exported
    assert logits_diff(trainer, theirs) > 1e-3  # the steps moved the weights: the export is not the import
    print(f"{family}: max |logit diff| import {imported:.2e}, export {exported:.2e}")


def test_fused_expert_tensors_import(tmp_path: Path) -> None:
    """transformers 5's fused 3-D experts (mlp.experts.gate_up_proj [E, 2F, D], down_proj [E, D, F]) import
    with the same logits; Mixtral's router is then mlp.gate too (block_sparse_moe on disk otherwise)."""
    for family in ("mixtral", "qwen2_moe"):
        theirs = save_tiny(family, tmp_path / family, fused=True)
        names = tensor_names(tmp_path / family)
        assert "model.layers.1.mlp.experts.gate_up_proj" in names and not any(".experts.0." in n for n in names)
        run = f"run.dir={tmp_path / f'run_{family}'}"
        trainer = make_trainer(compose([*import_overrides(tmp_path / family), *RUN, run]))
        assert logits_diff(trainer, theirs) <= 1e-4, family


def test_deepseek_rotate_half_layout_imports(tmp_path: Path) -> None:
    """DeepSeek-V3 with rope_interleave=false rotates (i, i + R/2): its rotary q and k rows are permuted."""
    theirs = save_tiny("deepseek_v3", tmp_path / "hf", rope_interleave=False)
    trainer = make_trainer(compose([*import_overrides(tmp_path / "hf"), *RUN, f"run.dir={tmp_path / 'run'}"]))
    assert logits_diff(trainer, theirs) <= 1e-4


YARN = {  # a 4x extension of a 32-token pre-training context: the tiny models' 128 positions all use it
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 8.0,
    "beta_slow": 1.0,
}
YARN_FAMILIES = {
    # DeepSeek's mscale pair: cos/sin by m(4, 0.707) / m(4, 1), softmax scale by m(4, 1)^2
    "deepseek_v3": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0},
    "qwen3_moe": YARN,  # cos/sin by m(4, 1), the paper's temperature
}


@pytest.mark.parametrize("family", list(YARN_FAMILIES))
def test_yarn_imports_and_exports(family: str, tmp_path: Path) -> None:
    """YaRN-scaled RoPE imports with transformers' logits at positions past the original context and exports
    back as yarn; the same weights with plain RoPE are far off (the scaling is what matches)."""
    theirs = save_tiny(family, tmp_path / "hf", rope_parameters=YARN_FAMILIES[family])
    overrides = [*import_overrides(tmp_path / "hf"), *RUN, "train.seq_len=128"]
    assert "model.rope_scaling=yarn" in overrides
    plain = make_trainer(compose([*overrides, "model.rope_scaling=none", f"run.dir={tmp_path / 'plain'}"]))
    assert logits_diff(plain, theirs) > 1e-2
    trainer = make_trainer(compose([*overrides, "checkpoint.enabled=true", f"run.dir={tmp_path / 'run'}"]))
    imported = logits_diff(trainer, theirs)
    assert imported <= 1e-4, imported

    trainer.fit()
    export(tmp_path / "run", tmp_path / "out")
    rope = json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]
    assert {k: rope[k] for k in YARN_FAMILIES[family]} == YARN_FAMILIES[family]
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    exported = logits_diff(trainer, back)
    assert exported <= 1e-4, exported
    print(f"{family} yarn: max |logit diff| import {imported:.2e}, export {exported:.2e}")


def test_published_deepseek_v3_rope_translates(tmp_path: Path) -> None:
    """DeepSeek-V3's published config.json (transformers 4 form: flat rope_theta, rope_scaling with "type")."""
    published = {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    }
    hf_dir = write_config(tmp_path, "deepseek_v3", rope_scaling=published, max_position_embeddings=163840)
    got = overrides_from_hf(read_hf_config(hf_dir, "import"))
    assert (got["model.rope_scaling"], got["model.yarn_factor"], got["model.yarn_original_max_seq_len"]) == (
        "yarn",
        40.0,
        4096,
    )
    assert (got["model.yarn_mscale"], got["model.yarn_mscale_all_dim"], got["model.max_seq_len"]) == (1.0, 1.0, 163840)


# --- config translation and refusals ------------------------------------------------------------------------


def write_config(tmp_path: Path, family: str, **changes) -> Path:
    config = {**hf_config(family).to_dict(), **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_import_maps_each_family_feature(tmp_path: Path) -> None:
    def derived(family: str, **changes) -> dict:
        sub = tmp_path / f"{family}{len(list(tmp_path.iterdir()))}"
        sub.mkdir()
        return overrides_from_hf(read_hf_config(write_config(sub, family, **changes), "import"))

    qwen2 = derived("qwen2_moe")
    assert (qwen2["model.first_dense_layers"], qwen2["model.moe_every"], qwen2["model.qkv_bias"]) == (1, 1, True)
    assert (qwen2["moe.shared_expert_hidden"], qwen2["moe.shared_expert_gate"], qwen2["moe.norm_topk_prob"]) == (
        48,
        True,
        False,
    )
    every_other = derived("qwen2_moe", mlp_only_layers=[], decoder_sparse_step=2, num_hidden_layers=4)
    assert (every_other["model.first_dense_layers"], every_other["model.moe_every"]) == (1, 2)
    assert derived("qwen3_moe")["model.head_dim_override"] == 24 and derived("qwen3_moe")["model.qk_norm"] == "head"
    ds = derived("deepseek_v3")
    assert (ds["moe.router"], ds["moe.route_scale"], ds["moe.n_groups"], ds["moe.topk_groups"]) == (
        "sigmoid_topk",
        2.5,
        4,
        2,
    )
    assert (ds["model.attention"], ds["model.first_dense_layers"], ds["model.q_lora_rank"]) == ("mla", 1, 16)
    olmoe = derived("olmoe")
    assert (olmoe["model.qk_norm"], olmoe["moe.norm_topk_prob"]) == ("full", False)
    glm = derived("glm4_moe")
    assert (glm["model.partial_rotary_factor"], glm["model.qkv_bias"], glm["model.qk_norm"]) == (0.5, True, "head")
    assert (glm["moe.router"], glm["moe.route_scale"], glm["moe.n_groups"], glm["model.first_dense_layers"]) == (
        "sigmoid_topk",
        2.5,
        4,
        1,
    )
    assert (glm["moe.num_shared_experts"], glm["model.head_dim_override"]) == (1, 24)
    assert derived("glm4_moe", use_qk_norm=False, attention_bias=False)["model.qk_norm"] == "none"


def test_published_glm_config_translates(tmp_path: Path) -> None:
    """GLM-4.5-Air's published config.json (transformers 4 form: flat rope_theta and partial_rotary_factor)
    gives the glm4_5_air preset's model; without the key, transformers' GLM default 0.5 applies."""
    air = {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "partial_rotary_factor": 0.5,
        "intermediate_size": 10944, "max_position_embeddings": 131072, "moe_intermediate_size": 1408,
        "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128,
        "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
        "num_hidden_layers": 46, "num_key_value_heads": 8, "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000, "tie_word_embeddings": False, "use_qk_norm": False, "vocab_size": 151552,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(air))
    cfg = compose(hydra_overrides(read_hf_config(tmp_path, "import")))
    preset = compose(["model=glm4_5_air"])
    assert {**vars(cfg.model), "name": "glm4_5_air"} == vars(preset.model)
    shape = ("num_experts", "top_k", "expert_hidden", "num_shared_experts", "route_scale", "router", "n_groups")
    assert {k: getattr(cfg.moe, k) for k in shape} == {k: getattr(preset.moe, k) for k in shape}
    del air["partial_rotary_factor"]
    (tmp_path / "config.json").write_text(json.dumps(air))
    assert overrides_from_hf(read_hf_config(tmp_path, "import"))["model.partial_rotary_factor"] == 0.5


IMPORT_REFUSALS = [
    ("deepseek_v3", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}}, "rope_type=linear"),
    ("qwen3_moe", {"rope_scaling": {"type": "dynamic", "factor": 4.0}}, "rope_scaling.rope_type=dynamic"),
    ("deepseek_v3", {"rope_scaling": {"type": "yarn", "factor": 40.0}}, "original_max_position_embeddings=None"),
    ("deepseek_v3", {"attention_bias": True}, "attention_bias=True"),
    ("deepseek_v3", {"quantization_config": {"quant_method": "mxfp4"}}, "quantization_config.quant_method=mxfp4"),
    ("deepseek_v3", {"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05"),
    ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0"),
    ("olmoe", {"attention_bias": True}, "attention_bias=True"),
    ("qwen3_moe", {"attention_bias": True}, "attention_bias=True"),
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("qwen2_moe", {"num_hidden_layers": 4, "mlp_only_layers": [2]}, "mlp_only_layers=1, [2]"),
    ("mixtral", {"sliding_window": 4096}, "sliding_window=4096"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act=gelu"),
]


@pytest.mark.parametrize(
    ("family", "changes", "field"), IMPORT_REFUSALS, ids=[f"{c[0]}-{c[2]}" for c in IMPORT_REFUSALS]
)
def test_import_refuses_what_has_no_equivalent(tmp_path: Path, family: str, changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match="import=.*config.json has ") as err:
        read_hf_config(write_config(tmp_path, family, **changes), "import")
    assert field in str(err.value) and len(str(err.value).splitlines()) == 1


GQA = dict(attention="gqa")
MLA = dict(attention="mla", norm_eps=1e-6, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8)
SIGMOID_SHARED = dict(router="sigmoid_topk", num_shared_experts=1)
EXPORT_REFUSALS = [
    # (our model fields, our moe fields, the family our config's structure selects, the field it refuses)
    (GQA, dict(router="sigmoid_topk"), "Mixtral", "moe.router=sigmoid_topk"),
    (GQA, dict(norm_topk_prob=False), "Mixtral", "moe.norm_topk_prob=False"),
    (dict(first_dense_layers=1), {}, "Mixtral", "model.first_dense_layers=1"),
    (dict(qkv_bias=True), {}, "Qwen2-MoE", "moe.num_shared_experts=0"),
    ({}, dict(num_shared_experts=1), "Qwen2-MoE", "moe.shared_expert_gate=False"),
    (dict(qk_norm="head", qkv_bias=True), {}, "Qwen3-MoE", "model.qkv_bias=True"),
    (dict(qk_norm="head"), dict(num_shared_experts=1), "Qwen3-MoE", "moe.num_shared_experts=1"),
    (dict(qk_norm="full", head_dim_override=32), {}, "OLMoE", "model.head_dim_override=32"),
    (dict(qk_norm="full"), dict(route_scale=2.0), "OLMoE", "moe.route_scale=2.0"),
    (MLA, dict(num_shared_experts=1), "DeepSeek-V3", "moe.router=softmax_topk"),
    ({**MLA, "norm_eps": 1e-5}, SIGMOID_SHARED, "DeepSeek-V3", "model.norm_eps=1e-05"),
    ({**MLA, "moe_every": 2}, SIGMOID_SHARED, "DeepSeek-V3", "model.moe_every=2"),
    (MLA, dict(router="sigmoid_topk"), "DeepSeek-V3", "moe.num_shared_experts=0"),
    (MLA, {**SIGMOID_SHARED, "shared_expert_gate": True}, "DeepSeek-V3", "moe.shared_expert_gate=True"),
    (MLA, {**SIGMOID_SHARED, "n_groups": 8, "topk_groups": 2}, "DeepSeek-V3", "moe.n_groups=8"),
    (dict(partial_rotary_factor=0.5), {}, "GLM-4.5-MoE", "moe.router=softmax_topk"),
    (dict(qk_norm="full"), SIGMOID_SHARED, "GLM-4.5-MoE", "model.qk_norm=full"),
    ({}, {**SIGMOID_SHARED, "shared_expert_gate": True}, "GLM-4.5-MoE", "moe.shared_expert_gate=True"),
    (dict(partial_rotary_factor=0.5), dict(router="sigmoid_topk"), "GLM-4.5-MoE", "moe.num_shared_experts=0"),
    ({"moe_every": 2}, SIGMOID_SHARED, "GLM-4.5-MoE", "model.moe_every=2"),
]


@pytest.mark.parametrize(("model", "moe", "title", "field"), EXPORT_REFUSALS, ids=[c[3] for c in EXPORT_REFUSALS])
def test_export_refuses_what_the_family_cannot_represent(model: dict, moe: dict, title: str, field: str) -> None:
    with pytest.raises(ValueError, match=f"has no Hugging Face {title} equivalent") as err:
        check_exportable(ModelConfig(**model), MoEConfig(**moe))
    assert str(err.value).startswith(field), str(err.value)


@pytest.mark.parametrize(
    ("preset", "title"),
    [
        ("mixtral_8x7b", "Mixtral"),
        ("qwen3_30b_a3b", "Qwen3-MoE"),
        ("olmoe_1b_7b", "OLMoE"),
        ("deepseek_v3", "DeepSeek-V3"),
        ("glm4_5_air", "GLM-4.5-MoE"),
    ],
)
def test_presets_export_as_their_family(preset: str, title: str) -> None:
    cfg = compose([f"model={preset}"])
    assert check_exportable(cfg.model, cfg.moe).title == title
