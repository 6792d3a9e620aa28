"""The Hugging Face model families moeyard reads and writes: for each, the HF class, its config.json both ways,
the names of its tensors, and the configs it cannot represent (refused naming the field).

| family      | HF class              | attention              | MoE block                                          |
|-------------|-----------------------|------------------------|----------------------------------------------------|
| mixtral     | MixtralForCausalLM    | GQA                    | softmax top-k, renormalised; every block MoE       |
| qwen2_moe   | Qwen2MoeForCausalLM   | GQA, q/k/v biases      | softmax top-k; one shared expert, sigmoid-gated    |
| qwen3_moe   | Qwen3MoeForCausalLM   | GQA, per-head q/k norm | softmax top-k; no shared expert                    |
| deepseek_v3 | DeepseekV3ForCausalLM | MLA                    | sigmoid top-k in groups, scaled, aux-free bias     |
| olmoe       | OlmoeForCausalLM      | GQA, full q/k norm     | softmax top-k, not renormalised; every block MoE   |
| glm4_moe    | Glm4MoeForCausalLM    | GQA, partial RoPE,     | sigmoid top-k in groups, scaled, aux-free bias;    |
|             |                       | q/k/v biases, q/k norm | shared experts; dense first blocks                 |
| gpt_oss     | GptOssForCausalLM     | GQA, sinks, q/k/v/o    | biased router, softmax over the top k; experts     |
|             |                       | biases, sliding blocks | with biases and clamped SwiGLU; every block MoE    |

Kimi-K2 (model_type kimi_k2) is DeepSeek-V3's architecture and imports as it; `fp8.py` dequantises the
block-quantised FP8 weights DeepSeek-V3 and Kimi-K2 publish.

Tensor names are given after `model.layers.{i}.`; `interop/hf.py` applies them (and the RoPE row permutation and
the expert layouts). Config translation is in Hydra override keys (`model.dim`, `moe.top_k`, ...) one way and
a config.json dict the other; a family's `rules` list what an export needs, each (holds, field, value, rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeyard.interop import fp8
from moeyard.moe.config import ModelConfig, MoEConfig

Rule = tuple[bool, str, object, str]
"""(holds, our field, its value, the rule): one condition a config must meet to export to a family."""


@dataclass(frozen=True)
class Spec:
    """Where one of our tensors (not a routed expert stack) lives in Hugging Face's layout.

    With `block`, dim 0 comes in blocks of that many rows (one per head) and, within each block, our row r is
    HF's row perm[r] (RoPE's pair layout against HF's rotate_half; `rotary_perm`).
    """

    hf: str
    """HF name after `model.layers.{i}.`."""
    block: int = 0
    perm: tuple[int, ...] = ()
    alt: str | None = None
    """Another name the tensor may have on disk (transformers 5's in-memory name, when it differs)."""


def rotary_perm(width: int, plain: int = 0, after: int = 0) -> tuple[int, ...]:
    """Within a block of `plain` untouched rows, `width` rotary rows, then `after` untouched rows (partial
    rotary: GLM-4.5 rotates the first half of each head): our rotary row 2i (2i+1) is HF's i (i + width/2),
    so our row r is HF's row perm[r]."""
    half = width // 2
    rotary = tuple(plain + r // 2 + (r % 2) * half for r in range(width))
    return tuple(range(plain)) + rotary + tuple(range(plain + width, plain + width + after))


def require(ok: bool, key: str, value: object, rule: str) -> None:
    """Raises ValueError naming an HF config.json key that has no moeyard equivalent."""
    if not ok:
        raise ValueError(f"config.json has {key}={value} (rule: {rule})")


class Family:
    """One HF architecture. Subclasses set the class attributes and write the three translations."""

    model_type: str
    architecture: str
    title: str
    required: tuple[str, ...]
    """config.json keys the family cannot do without."""
    aliases = {"num_local_experts": "num_experts"}
    """Other spellings of a key (transformers' attribute_map: a config may be saved under either)."""
    moe_prefix = "mlp"
    """Prefix of the router and per-expert tensors on disk (fused 3-D experts are always under mlp.experts)."""
    expert_projs = ("gate_proj", "up_proj", "down_proj")
    """HF names of our w1, w3, w2."""
    shared_prefix = "mlp.shared_experts"
    expert_bias: str | None = None
    """HF name of our aux-free selection bias (router.expert_bias), if the family has one."""
    default_rope_theta = 10000.0
    mtp = False
    """Whether the family stores multi-token-prediction modules (model.mtp_layers) as blocks after the main
    ones (`MTP_SPECS`)."""

    experts_to_hf = None
    """Families whose experts are fused on disk (gpt-oss) write them with this (see GptOss); None: the
    per-expert layout `interop.hf.TensorMap` writes."""
    read_experts = None
    """Likewise for import; None: either of the layouts `TensorMap` reads."""

    def normalise(self, hf: dict) -> dict:
        """`hf` with each alias spelled the canonical way."""
        return {**{canon: hf[alias] for alias, canon in self.aliases.items() if alias in hf}, **hf}

    def rotate_half(self, hf: dict) -> bool:
        """Whether HF rotates (i, i + R/2) rather than our (2i, 2i+1) pairs: q/k rows are then permuted."""
        return True

    def overrides(self, hf: dict) -> dict[str, object]:
        """Our model/moe config of the HF model, as Hydra override keys; ValueError names a key that does
        not map (`require`)."""
        raise NotImplementedError

    def config(self, m: ModelConfig, e: MoEConfig) -> dict:
        """The family's config.json (without dtype) for our config, which `rules` accepted."""
        raise NotImplementedError

    def rules(self, m: ModelConfig, e: MoEConfig) -> list[Rule]:
        """What our config must meet to export as this family (the first that fails is refused)."""
        raise NotImplementedError

    def specs(self, m: ModelConfig, hf: dict) -> dict[str, Spec]:
        """Our block tensors (name after `layers.{i}.`) and where each lives, for the RoPE layout config.json
        `hf` names ({}: the one our export writes); routed experts are separate."""
        specs = {
            "attention_norm.weight": Spec("input_layernorm.weight"),
            "ffn_norm.weight": Spec("post_attention_layernorm.weight"),
            "feed_forward.w1.weight": Spec("mlp.gate_proj.weight"),
            "feed_forward.w3.weight": Spec("mlp.up_proj.weight"),
            "feed_forward.w2.weight": Spec("mlp.down_proj.weight"),
            "moe.router.gate.weight": Spec(f"{self.moe_prefix}.gate.weight", alt="mlp.gate.weight"),
            "moe.shared_expert_gate.weight": Spec("mlp.shared_expert_gate.weight"),
        }
        for ours, theirs in zip(("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"), strict=True):
            specs[f"moe.shared_experts.{ours}.weight"] = Spec(f"{self.shared_prefix}.{theirs}.weight")
        if self.expert_bias:
            specs["moe.router.expert_bias"] = Spec(self.expert_bias)
        rotate = self.rotate_half(hf)
        specs.update(_mla_specs(m, rotate) if m.attention == "mla" else _gqa_specs(m, rotate))
        return {**specs, **MTP_SPECS} if self.mtp and m.mtp_layers else specs


MTP_SPECS = {
    "enorm.weight": Spec("enorm.weight"),
    "hnorm.weight": Spec("hnorm.weight"),
    "eh_proj.weight": Spec("eh_proj.weight"),
    "norm.weight": Spec("shared_head.norm.weight"),
}
"""DeepSeek-V3's MTP module k (HF `model.layers.{n_layers + k - 1}.`) besides its block: our `mtp.{id}.` names
(moe/mtp.py). The layer also stores `embed_tokens` and `shared_head.head`: copies of the shared embedding and
head (`MTP_COPIES`), written on export and checked equal to them on import."""

MTP_COPIES = {"tok_embeddings.weight": "embed_tokens.weight", "output.weight": "shared_head.head.weight"}


def _gqa_specs(m: ModelConfig, rotate: bool) -> dict[str, Spec]:
    hd = m.head_dim
    rows = {"block": hd, "perm": rotary_perm(m.rope_dim, 0, hd - m.rope_dim)} if rotate else {}
    specs = {"attention.wo.weight": Spec("self_attn.o_proj.weight")}
    for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
        for kind in ("weight", "bias"):
            specs[f"attention.{ours}.{kind}"] = Spec(f"self_attn.{theirs}.{kind}", **(rows if ours != "wv" else {}))
    for q_or_k in ("q", "k"):  # per-head (Qwen3) or full-width (OLMoE) norm weights move with their rows
        specs[f"attention.{q_or_k}_norm.weight"] = Spec(f"self_attn.{q_or_k}_norm.weight", **rows)
        specs[f"attention.{q_or_k}_head_norm.weight"] = Spec(f"self_attn.{q_or_k}_norm.weight", **rows)
    return specs


def _mla_specs(m: ModelConfig, rotate: bool) -> dict[str, Spec]:
    nope, rope, latent = m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank
    q_rows = {"block": nope + rope, "perm": rotary_perm(rope, nope)} if rotate else {}
    kv_rows = {"block": latent + rope, "perm": rotary_perm(rope, latent)} if rotate else {}
    return {
        "attention.wq.weight": Spec("self_attn.q_proj.weight", **q_rows),
        "attention.wq_a.weight": Spec("self_attn.q_a_proj.weight"),
        "attention.q_a_norm.weight": Spec("self_attn.q_a_layernorm.weight"),
        "attention.wq_b.weight": Spec("self_attn.q_b_proj.weight", **q_rows),
        "attention.wkv_a.weight": Spec("self_attn.kv_a_proj_with_mqa.weight", **kv_rows),
        "attention.kv_a_norm.weight": Spec("self_attn.kv_a_layernorm.weight"),
        "attention.wkv_b.weight": Spec("self_attn.kv_b_proj.weight"),
        "attention.wo.weight": Spec("self_attn.o_proj.weight"),
    }


# --- config translation shared by the families --------------------------------------------------------------


def rope_overrides(hf: dict, default_theta: float) -> dict[str, object]:
    """RoPE base and scaling from transformers 5's rope_parameters or 4's rope_theta and rope_scaling (which
    wins when both are there, as in transformers). YaRN maps onto the model.yarn_* fields, with transformers'
    defaults (beta 32/1; factor = max_position_embeddings / original when absent); other scalings (linear,
    dynamic, llama3, longrope) are refused."""
    where = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(where) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    require(kind in ("default", "yarn"), f"{where}.rope_type", kind, "must be default or yarn (moeyard's RoPE)")
    theta = {"model.rope_theta": float(params.get("rope_theta", hf.get("rope_theta", default_theta)))}
    if kind == "default":
        return theta
    original = params.get("original_max_position_embeddings")
    require(original is not None, f"{where}.original_max_position_embeddings", None, "must be set for yarn")
    attention_factor = params.get("attention_factor")
    require(attention_factor is None, f"{where}.attention_factor", attention_factor, "must be unset (derived)")
    return theta | {
        "model.rope_scaling": "yarn",
        "model.yarn_truncate": bool(params.get("truncate", True)),
        "model.yarn_factor": float(params.get("factor") or hf["max_position_embeddings"] / original),
        "model.yarn_original_max_seq_len": int(original),
        "model.yarn_beta_fast": float(params.get("beta_fast") or 32),
        "model.yarn_beta_slow": float(params.get("beta_slow") or 1),
        "model.yarn_mscale": float(params.get("mscale") or 0),
        "model.yarn_mscale_all_dim": float(params.get("mscale_all_dim") or 0),
    }


def _rope_config(m: ModelConfig) -> dict:
    """transformers 5's rope_parameters for our RoPE (what `rope_overrides` reads back)."""
    params = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "yarn":
        params |= {
            "rope_type": "yarn",
            "factor": m.yarn_factor,
            "original_max_position_embeddings": m.yarn_original_max_seq_len,
            "beta_fast": m.yarn_beta_fast,
            "beta_slow": m.yarn_beta_slow,
            "mscale": m.yarn_mscale,
            "mscale_all_dim": m.yarn_mscale_all_dim,
        }
        if not m.yarn_truncate:  # written only where it differs from transformers' default
            params["truncate"] = False
    return params


def _base_overrides(hf: dict, family: Family) -> dict[str, object]:
    require(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "must be silu (SwiGLU)")
    fp8.block_shape(hf)  # block-quantised FP8 weights are dequantised as they are read; other formats refused
    heads = hf["num_attention_heads"]
    return {
        "model.name": f"{family.model_type}_import",
        "model.vocab_size": hf["vocab_size"],
        "model.dim": hf["hidden_size"],
        "model.n_layers": hf["num_hidden_layers"],
        "model.n_heads": heads,
        "model.n_kv_heads": hf.get("num_key_value_heads") or heads,
        "model.max_seq_len": hf["max_position_embeddings"],
        **rope_overrides(hf, family.default_rope_theta),
        "model.partial_rotary_factor": 1.0,
        "model.norm_eps": hf["rms_norm_eps"],
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def _gqa_overrides(hf: dict, qk_norm: str, qkv_bias: bool, head_dim_key: bool = True) -> dict[str, object]:
    natural = hf["hidden_size"] // hf["num_attention_heads"]
    head_dim = (hf.get("head_dim") if head_dim_key else None) or natural
    return {
        "model.attention": "gqa",
        "model.head_dim_override": None if head_dim == natural else head_dim,
        "model.qk_norm": qk_norm,
        "model.qkv_bias": qkv_bias,
    }


def _softmax_overrides(hf: dict, norm_topk_prob: bool) -> dict[str, object]:
    return {
        "moe.top_k": hf["num_experts_per_tok"],
        "moe.router": "softmax_topk",
        "moe.norm_topk_prob": norm_topk_prob,
        "moe.route_scale": 1.0,
        "moe.n_groups": 1,
        "moe.topk_groups": 1,
        "moe.bias_update_rate": 0.0,
    }


def _unshared() -> dict[str, object]:
    return {"moe.num_shared_experts": 0, "moe.shared_expert_hidden": None, "moe.shared_expert_gate": False}


def _placement(hf: dict) -> dict[str, object]:
    """Qwen's MoE placement (block i is MoE when (i + 1) % decoder_sparse_step == 0 and i is not in
    mlp_only_layers) as our dense prefix plus every-k-th block."""
    step, dense_only = hf.get("decoder_sparse_step", 1) or 1, hf.get("mlp_only_layers") or []
    n = hf["num_hidden_layers"]
    theirs = [i for i in range(n) if i not in dense_only and (i + 1) % step == 0]
    key, value = "decoder_sparse_step, mlp_only_layers", f"{step}, {dense_only}"
    require(bool(theirs), key, value, "at least one block must be MoE")
    first = theirs[0]
    every = theirs[1] - first if len(theirs) > 1 else n - first
    ours = [i for i in range(first, n) if (i - first) % every == 0]
    require(ours == theirs, key, value, "MoE blocks must be every k-th block after a dense prefix")
    return {"model.first_dense_layers": first, "model.moe_every": every}


def _grouped_moe_config(m: ModelConfig, e: MoEConfig) -> dict:
    """The MoE keys DeepSeek-V3 and GLM-4.5 share: dense-first blocks, shared experts, group-limited routing."""
    return {
        "intermediate_size": m.ffn_hidden,
        "moe_intermediate_size": e.expert_hidden,
        "first_k_dense_replace": m.first_dense_layers,
        "n_routed_experts": e.num_experts,
        "n_shared_experts": e.num_shared_experts,
        "norm_topk_prob": e.norm_topk_prob,
        "routed_scaling_factor": e.route_scale,
        "n_group": e.n_groups,
        "topk_group": e.topk_groups,
        "num_nextn_predict_layers": m.mtp_layers,
    }


def _grouped_moe_overrides(hf: dict, experts: int, groups: int, top_groups: int, shared: int) -> dict:
    """The MoE overrides DeepSeek-V3 and GLM-4.5 share (the import side of `_grouped_moe_config`)."""
    return {
        "model.ffn_hidden": hf["intermediate_size"],
        "model.first_dense_layers": hf["first_k_dense_replace"],
        "model.moe_every": 1,
        "moe.num_experts": experts,
        "moe.top_k": hf["num_experts_per_tok"],
        "moe.expert_hidden": hf["moe_intermediate_size"],
        "moe.router": "sigmoid_topk",
        "moe.norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
        "moe.route_scale": float(hf["routed_scaling_factor"]),
        "moe.n_groups": groups,
        "moe.topk_groups": top_groups,
        "moe.num_shared_experts": shared,
    }


def _base_config(m: ModelConfig, e: MoEConfig, family: Family) -> dict:
    """config.json keys every family shares (rope_theta flat for transformers 4, nested for 5)."""
    return {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": _rope_config(m),
        "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0,
        "num_experts_per_tok": e.top_k,
        "output_router_logits": False,
        "router_aux_loss_coef": e.aux_loss_coef,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": None,  # the byte tokenizer's separator is 0
    }


def _softmax_rules(e: MoEConfig) -> list[Rule]:
    return [
        (e.router == "softmax_topk", "moe.router", e.router, "must be softmax_topk"),
        (e.route_scale == 1.0, "moe.route_scale", e.route_scale, "must be 1.0"),
        (e.n_groups == 1, "moe.n_groups", e.n_groups, "must be 1 (no group-limited routing)"),
        (e.bias_update_rate == 0, "moe.bias_update_rate", e.bias_update_rate, "must be 0 (no selection bias)"),
    ]


def _gqa_rules(m: ModelConfig, qk_norm: str, qkv_bias: bool | None) -> list[Rule]:
    """GQA with the family's q/k norm; `qkv_bias` None: either."""
    rules = [
        (m.attention == "gqa", "model.attention", m.attention, "must be gqa"),
        (m.qk_norm == qk_norm, "model.qk_norm", m.qk_norm, f"must be {qk_norm}"),
    ]
    if qkv_bias is not None:
        rules.append((m.qkv_bias == qkv_bias, "model.qkv_bias", m.qkv_bias, f"must be {str(qkv_bias).lower()}"))
    return rules


def _unshared_rules(e: MoEConfig) -> list[Rule]:
    return [(e.num_shared_experts == 0, "moe.num_shared_experts", e.num_shared_experts, "must be 0 (no shared)")]


def _all_moe_rules(m: ModelConfig) -> list[Rule]:
    return [
        (m.first_dense_layers == 0, "model.first_dense_layers", m.first_dense_layers, "must be 0 (all blocks MoE)"),
        (m.moe_every == 1, "model.moe_every", m.moe_every, "must be 1 (all blocks MoE)"),
    ]


def _qwen_placement_config(m: ModelConfig) -> dict:
    return {"decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(m.n_layers) if not m.is_moe_layer(i)]}


# --- the families ---------------------------------------------------------------------------------------------


class Mixtral(Family):
    model_type, architecture, title = "mixtral", "MixtralForCausalLM", "Mixtral"
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "num_local_experts", "num_experts_per_tok")  # fmt: skip
    aliases = {"num_experts": "num_local_experts"}
    moe_prefix = "block_sparse_moe"  # on disk; transformers 5 renames it mlp in memory
    expert_projs = ("w1", "w3", "w2")
    default_rope_theta = 1e6

    def overrides(self, hf: dict) -> dict[str, object]:
        window = hf.get("sliding_window")
        require(window is None, "sliding_window", window, "must be null (moeyard attends to the whole sequence)")
        return {
            **_base_overrides(hf, self),
            **_gqa_overrides(hf, "none", False),
            "model.first_dense_layers": 0,
            "model.moe_every": 1,
            "moe.num_experts": hf["num_local_experts"],
            "moe.expert_hidden": hf["intermediate_size"],
            **_softmax_overrides(hf, True),
            **_unshared(),
        }

    def config(self, m: ModelConfig, e: MoEConfig) -> dict:
        return {
            **_base_config(m, e, self),
            "head_dim": m.head_dim,
            "intermediate_size": e.expert_hidden,
            "num_local_experts": e.num_experts,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
        }

    def rules(self, m: ModelConfig, e: MoEConfig) -> list[Rule]:
        renorm = (e.norm_topk_prob, "moe.norm_topk_prob", e.norm_topk_prob, "must be true (Mixtral renormalises)")
        return [*_softmax_rules(e), renorm, *_unshared_rules(e), *_all_moe_rules(m), *_gqa_rules(m, "none", False)]


class Qwen2Moe(Family):
    model_type, architecture, title = "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2-MoE"
    required = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "num_experts",
                "num_experts_per_tok", "shared_expert_intermediate_size")  # fmt: skip
    shared_prefix = "mlp.shared_expert"

    def overrides(self, hf: dict) -> dict[str, object]:
        window = hf.get("use_sliding_window", False)
        require(not window, "use_sliding_window", window, "must be false (moeyard attends to the whole sequence)")
        shared = hf["shared_expert_intermediate_size"]
        return {
            **_base_overrides(hf, self),
            **_gqa_overrides(hf, "none", bool(hf.get("qkv_bias", True))),  # before the key existed: always biased
            "model.ffn_hidden": hf["intermediate_size"],
            **_placement(hf),
            "moe.num_experts": hf["num_experts"],
            "moe.expert_hidden": hf["moe_intermediate_size"],
            **_softmax_overrides(hf, bool(hf.get("norm_topk_prob", False))),
            "moe.num_shared_experts": 1 if shared else 0,
            "moe.shared_expert_hidden": shared or None,
            "moe.shared_expert_gate": bool(shared),
        }

    def config(self, m: ModelConfig, e: MoEConfig) -> dict:
        return {
            **_base_config(m, e, self),
            "head_dim": m.head_dim,
            "qkv_bias": m.qkv_bias,
            "intermediate_size": m.ffn_hidden,
            "moe_intermediate_size": e.expert_hidden,
            "shared_expert_intermediate_size": e.shared_hidden,
            "num_experts": e.num_experts,
            "norm_topk_prob": e.norm_topk_prob,
            **_qwen_placement_config(m),
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": m.n_layers,
        }

    def rules(self, m: ModelConfig, e: MoEConfig) -> list[Rule]:
        one = "must be >= 1 (Qwen2-MoE has a shared expert)"
        return [
            *_softmax_rules(e),
            (e.num_shared_experts >= 1, "moe.num_shared_experts", e.num_shared_experts, one),
            (e.shared_expert_gate, "moe.shared_expert_gate", e.shared_expert_gate, "must be true (gated)"),
            *_gqa_rules(m, "none", None),
        ]


class Qwen3Moe(Family):
    model_type, architecture, title = "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3-MoE"
    required = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "num_experts",
                "num_experts_per_tok")  # fmt: skip

    def overrides(self, hf: dict) -> dict[str, object]:
        window = hf.get("use_sliding_window", False)
        require(not window, "use_sliding_window", window, "must be false (moeyard attends to the whole sequence)")
        bias = hf.get("attention_bias", False)
        require(not bias, "attention_bias", bias, "must be false (moeyard's o projection has no bias)")
        return {
            **_base_overrides(hf, self),
            **_gqa_overrides(hf, "head", False),
            "model.ffn_hidden": hf["intermediate_size"],
            **_placement(hf),
            "moe.num_experts": hf["num_experts"],
            "moe.expert_hidden": hf["moe_intermediate_size"],
            **_softmax_overrides(hf, bool(hf.get("norm_topk_prob", False))),
            **_unshared(),
        }

    def config(self, m: ModelConfig, e: MoEConfig) -> dict:
        return {
            **_base_config(m, e, self),
            "head_dim": m.head_dim,
            "attention_bias": False,
            "intermediate_size": m.ffn_hidden,
            "moe_intermediate_size": e.expert_hidden,
            "num_experts": e.num_experts,
            "norm_topk_prob": e.norm_topk_prob,
            **_qwen_placement_config(m),
            "use_sliding_window": False,
            "sliding_window": None,
        }

    def rules(self, m: ModelConfig, e: MoEConfig) -> list[Rule]:
        return [*_softmax_rules(e), *_unshared_rules(e), *_gqa_rules(m, "head", False)]


class DeepseekV3(Family):
    model_type, architecture, title = "deepseek_v3", "DeepseekV3ForCausalLM", "DeepSeek-V3"
    required = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "n_routed_experts",
                "num_experts_per_tok", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim",
                "v_head_dim", "q_lora_rank", "n_group", "topk_group", "routed_scaling_factor",
                "first_k_dense_replace", "n_shared_experts")  # fmt: skip
    """(HF's defaults for the routing and shape keys are DeepSeek-V3's own, not a plain model's: required.)"""
    aliases = {"num_local_experts": "n_routed_experts"}
    expert_bias = "mlp.gate.e_score_correction_bias"
    mtp = True
    LATENT_EPS = 1e-6
    """HF's MLA latent norms (q_a_layernorm, kv_a_layernorm) use this eps whatever rms_norm_eps says."""

    def rotate_half(self, hf: dict) -> bool:
        return not hf.get("rope_interleave", True)

    def overrides(self, hf: dict) -> dict[str, object]:
        heads, experts = hf["num_attention_heads"], hf["n_routed_experts"]
        kv = hf.get("num_key_value_heads") or heads
        require(kv == heads, "num_key_value_heads", kv, f"must equal num_attention_heads={heads} with MLA")
        bias = hf.get("attention_bias", False)
        require(not bias, "attention_bias", bias, "must be false (moeyard's MLA has no biases)")
        eps = hf["rms_norm_eps"]
        require(eps == self.LATENT_EPS, "rms_norm_eps", eps, "must be 1e-06 (HF's MLA latent norms use 1e-06)")
        freq = hf.get("moe_layer_freq", 1)
        require(freq == 1, "moe_layer_freq", freq, "must be 1 (every block after first_k_dense_replace is MoE)")
        scoring, method = hf.get("scoring_func", "sigmoid"), hf.get("topk_method", "noaux_tc")
        require(scoring == "sigmoid", "scoring_func", scoring, "must be sigmoid (DeepSeek-V3's routing)")
        require(method == "noaux_tc", "topk_method", method, "must be noaux_tc (group top-k, aux-free bias)")
        groups, top_groups = hf["n_group"], hf["topk_group"]
        pair = "must divide n_routed_experts into groups of >= 2 (a group scores its best two)"
        require(experts % groups == 0 and experts // groups >= 2, "n_group", groups, pair)
        return {
            **_base_overrides(hf, self),
            "model.n_kv_heads": heads,
            "model.attention": "mla",
            "model.head_dim_override": None,
            "model.qk_norm": "none",
            "model.qkv_bias": False,
            "model.q_lora_rank": hf["q_lora_rank"] or 0,  # null: one plain query projection
            "model.kv_lora_rank": hf["kv_lora_rank"],
            "model.qk_rope_head_dim": hf["qk_rope_head_dim"],
            "model.qk_nope_head_dim": hf["qk_nope_head_dim"],
            "model.v_head_dim": hf["v_head_dim"],
            **_grouped_moe_overrides(hf, experts, groups, top_groups, hf["n_shared_experts"]),
            "moe.shared_expert_hidden": None,
            "moe.shared_expert_gate": False,
            # `interop.hf.read_hf_config` sets it to 0 where the weights lack the MTP layers
            "model.mtp_layers": hf.get("num_nextn_predict_layers", 0),
        }

    def config(self, m: ModelConfig, e: MoEConfig) -> dict:
        return {
            **_base_config(m, e, self),
            "num_key_value_heads": m.n_heads,
            "q_lora_rank": m.q_lora_rank or None,
            "kv_lora_rank": m.kv_lora_rank,
            "qk_rope_head_dim": m.qk_rope_head_dim,
            "qk_nope_head_dim": m.qk_nope_head_dim,
            "v_head_dim": m.v_head_dim,
            "rope_interleave": True,  # our pair layout: no permutation
            "attention_bias": False,
            **_grouped_moe_config(m, e),
        }

    def rules(self, m: ModelConfig, e: MoEConfig) -> list[Rule]:
        width = e.num_shared_experts * e.expert_hidden
        eps = "must be 1e-06 (HF's MLA latent norms use 1e-06; ours use model.norm_eps)"
        groups = "must leave >= 2 experts per group (HF's group score is the sum of the best two)"
        return [
            (m.attention == "mla", "model.attention", m.attention, "must be mla"),
            (m.norm_eps == self.LATENT_EPS, "model.norm_eps", m.norm_eps, eps),
            (e.router == "sigmoid_topk", "moe.router", e.router, "must be sigmoid_topk"),
            (e.num_experts // e.n_groups >= 2, "moe.n_groups", e.n_groups, groups),
            (e.num_shared_experts >= 1, "moe.num_shared_experts", e.num_shared_experts, "must be >= 1"),
            (e.shared_hidden == width, "moe.shared_expert_hidden", e.shared_expert_hidden, f"must be null or {width}"),
            (not e.shared_expert_gate, "moe.shared_expert_gate", e.shared_expert_gate, "must be false"),
            (m.moe_every == 1, "model.moe_every", m.moe_every, "must be 1 (MoE after the dense prefix)"),
        ]


class Olmoe(Family):
    model_type, architecture, title = "olmoe", "OlmoeForCausalLM", "OLMoE"
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "num_experts", "num_experts_per_tok")  # fmt: skip

    def overrides(self, hf: dict) -> dict[str, object]:
        bias, clip = hf.get("attention_bias", False), hf.get("clip_qkv")
        require(not bias, "attention_bias", bias, "must be false (moeyard's o projection has no bias)")
        require(clip is None, "clip_qkv", clip, "must be null (moeyard does not clip q/k/v)")
        return {
            **_base_overrides(hf, self),
            **_gqa_overrides(hf, "full", False, head_dim_key=False),  # OLMoE's q_norm is hidden_size wide
            "model.first_dense_layers": 0,
            "model.moe_every": 1,
            "moe.num_experts": hf["num_experts"],
            "moe.expert_hidden": hf["intermediate_size"],
            **_softmax_overrides(hf, bool(hf.get("norm_topk_prob", False))),
            **_unshared(),
        }

    def config(self, m: ModelConfig, e: MoEConfig) -> dict:
        return {
            **_base_config(m, e, self),
            "attention_bias": False,
            "clip_qkv": None,
            "intermediate_size": e.expert_hidden,
            "num_experts": e.num_experts,
            "norm_topk_prob": e.norm_topk_prob,
        }

    def rules(self, m: ModelConfig, e: MoEConfig) -> list[Rule]:
        natural = m.head_dim == m.dim // m.n_heads
        width = (natural, "model.head_dim_override", m.head_dim_override, "must be null (q_norm is dim wide)")
        return [*_softmax_rules(e), *_unshared_rules(e), *_all_moe_rules(m), *_gqa_rules(m, "full", False), width]


class Glm4Moe(Family):
    model_type, architecture, title = "glm4_moe", "Glm4MoeForCausalLM", "GLM-4.5-MoE"
    required = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "rms_norm_eps", "n_routed_experts",
                "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
                "first_k_dense_replace", "n_shared_experts")  # fmt: skip
    """(As DeepSeek-V3's: HF's defaults for the routing and shape keys are GLM-4.5-Air's own: required.)"""
    aliases = {"num_local_experts": "n_routed_experts"}
    expert_bias = "mlp.gate.e_score_correction_bias"
    DEFAULT_PARTIAL_ROTARY = 0.5
    """transformers' GLM config fills in 0.5 where config.json names no partial_rotary_factor."""

    def overrides(self, hf: dict) -> dict[str, object]:
        experts, groups, shared = hf["n_routed_experts"], hf["n_group"], hf["n_shared_experts"]
        pair = "must divide n_routed_experts into groups of >= 2 (a group scores its best two)"
        require(experts % groups == 0 and experts // groups >= 2, "n_group", groups, pair)
        require(shared >= 1, "n_shared_experts", shared, "must be >= 1 (moeyard's GLM has shared experts)")
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", self.DEFAULT_PARTIAL_ROTARY))
        return {
            **_base_overrides(hf, self),
            **_gqa_overrides(hf, "head" if hf.get("use_qk_norm") else "none", bool(hf.get("attention_bias"))),
            "model.partial_rotary_factor": float(partial),
            **_grouped_moe_overrides(hf, experts, groups, hf["topk_group"], shared),
            "moe.shared_expert_hidden": None,
            "moe.shared_expert_gate": False,
        }

    def config(self, m: ModelConfig, e: MoEConfig) -> dict:
        base = _base_config(m, e, self)
        return {
            **base,
            "rope_parameters": {**base["rope_parameters"], "partial_rotary_factor": m.partial_rotary_factor},
            "partial_rotary_factor": m.partial_rotary_factor,  # where transformers 4 reads it
            "head_dim": m.head_dim,
            "attention_bias": m.qkv_bias,
            "use_qk_norm": m.qk_norm == "head",
            **_grouped_moe_config(m, e),
        }

    def rules(self, m: ModelConfig, e: MoEConfig) -> list[Rule]:
        width = e.num_shared_experts * e.expert_hidden
        groups = "must leave >= 2 experts per group (HF's group score is the sum of the best two)"
        return [
            (m.attention == "gqa", "model.attention", m.attention, "must be gqa"),
            (m.qk_norm in ("none", "head"), "model.qk_norm", m.qk_norm, "must be none or head (use_qk_norm)"),
            (e.router == "sigmoid_topk", "moe.router", e.router, "must be sigmoid_topk"),
            (e.num_experts // e.n_groups >= 2, "moe.n_groups", e.n_groups, groups),
            (e.num_shared_experts >= 1, "moe.num_shared_experts", e.num_shared_experts, "must be >= 1"),
            (e.shared_hidden == width, "moe.shared_expert_hidden", e.shared_expert_hidden, f"must be null or {width}"),
            (not e.shared_expert_gate, "moe.shared_expert_gate", e.shared_expert_gate, "must be false"),
            (m.moe_every == 1, "model.moe_every", m.moe_every, "must be 1 (MoE after the dense prefix)"),
        ]


class GptOss(Family):
    """gpt-oss: GQA with attention sinks, q/k/v/o biases and sliding-window blocks; every block MoE, the router
    a biased linear whose top-k logits are softmaxed (equal to our softmax over all experts renormalised over
    the chosen k), experts with biases and the clamped SwiGLU. The experts are fused on disk:
    `mlp.experts.gate_up_proj` [E, D, 2F] with gate and up columns interleaved (gate 2f, up 2f + 1) and its
    bias [E, 2F] likewise, `mlp.experts.down_proj` [E, F, D] (our w2's layout) and its bias [E, D]."""

    model_type, architecture, title = "gpt_oss", "GptOssForCausalLM", "gpt-oss"
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "rms_norm_eps", "num_local_experts", "num_experts_per_tok")  # fmt: skip
    aliases = {"num_experts": "num_local_experts"}
    default_rope_theta = 150000.0
    FUSED = {
        "w1": ("gate_up_proj", 0),
        "w3": ("gate_up_proj", 1),
        "w2": ("down_proj", None),
        "b1": ("gate_up_proj_bias", 0),
        "b3": ("gate_up_proj_bias", 1),
        "b2": ("down_proj_bias", None),
    }
    """Our expert tensor -> (HF tensor under mlp.experts, its interleaved column: 0 gate, 1 up; None: whole)."""

    def overrides(self, hf: dict) -> dict[str, object]:
        n, window = hf["num_hidden_layers"], hf.get("sliding_window") or 0
        types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        layers = "even" if sliding == list(range(0, n, 2)) else "all"
        rule = "must slide on the even blocks (gpt-oss), on all, or on none"
        require(sliding in (list(range(0, n, 2)), list(range(n)), []), "layer_types", types, rule)
        require(bool(window) or not sliding, "sliding_window", window, "must be >= 1 where layer_types slide")
        bias = bool(hf.get("attention_bias", True))
        return {
            **_base_overrides(hf, self),
            **_gqa_overrides(hf, "none", bias),
            "model.o_bias": bias,
            "model.attention_sinks": True,
            "model.sliding_window": window if sliding else 0,
            "model.sliding_layers": layers,
            "model.ffn_hidden": hf["intermediate_size"],
            "model.first_dense_layers": 0,
            "model.moe_every": 1,
            "moe.num_experts": hf["num_local_experts"],
            "moe.expert_hidden": hf["intermediate_size"],
            **_softmax_overrides(hf, True),
            **_unshared(),
            "moe.router_bias": True,
            "moe.expert_biases": True,
            "moe.activation": "clamped_swiglu",
            "moe.swiglu_alpha": float(hf.get("swiglu_alpha", 1.702)),
            "moe.swiglu_limit": float(hf.get("swiglu_limit", 7.0)),
        }

    def config(self, m: ModelConfig, e: MoEConfig) -> dict:
        types = ["sliding_attention" if m.window(i) else "full_attention" for i in range(m.n_layers)]
        return {
            **_base_config(m, e, self),
            "head_dim": m.head_dim,
            "attention_bias": m.qkv_bias,
            "intermediate_size": e.expert_hidden,
            "num_local_experts": e.num_experts,
            "sliding_window": m.sliding_window or None,
            "layer_types": types,
            "swiglu_alpha": e.swiglu_alpha,
            "swiglu_limit": e.swiglu_limit,
        }

    def rules(self, m: ModelConfig, e: MoEConfig) -> list[Rule]:
        both = f"must equal model.qkv_bias={m.qkv_bias} (one attention_bias)"
        return [
            *_softmax_rules(e),
            (e.norm_topk_prob, "moe.norm_topk_prob", e.norm_topk_prob, "must be true (softmax over the top k)"),
            *_unshared_rules(e),
            *_all_moe_rules(m),
            *_gqa_rules(m, "none", None),
            (m.o_bias == m.qkv_bias, "model.o_bias", m.o_bias, both),
            (m.attention_sinks, "model.attention_sinks", m.attention_sinks, "must be true"),
            (e.router_bias, "moe.router_bias", e.router_bias, "must be true"),
            (e.expert_biases, "moe.expert_biases", e.expert_biases, "must be true"),
            (e.activation == "clamped_swiglu", "moe.activation", e.activation, "must be clamped_swiglu"),
        ]

    def specs(self, m: ModelConfig, hf: dict) -> dict[str, Spec]:
        return {
            **super().specs(m, hf),
            "attention.wo.bias": Spec("self_attn.o_proj.bias"),
            "attention.sinks.weight": Spec("self_attn.sinks"),
            "moe.router.gate.weight": Spec("mlp.router.weight"),
            "moe.router.gate.bias": Spec("mlp.router.bias"),
        }

    def experts_to_hf(
        self, prefix: str, ours: str, t: torch.Tensor, held: dict[str, torch.Tensor]
    ) -> list[tuple[str, torch.Tensor]]:
        """HF tensors for our expert tensor `ours` (w1..b3); a gate half is held until its up half comes."""
        name, column = self.FUSED[ours]
        if column == 0:
            held[name] = t
            return []
        if column == 1:  # interleave: gate f at column 2f, up f at 2f + 1
            t = torch.stack([held.pop(name), t], dim=-1).flatten(-2)
        return [(f"{prefix}mlp.experts.{name}", t)]

    def read_experts(
        self, prefix: str, ours: str, full_shape: torch.Size, box: tuple[slice, ...], reader
    ) -> torch.Tensor:
        """The `box` of our expert tensor `ours` from the fused HF tensors (the interleaved columns of its half)."""
        name, column = self.FUSED[ours]
        if column is None:
            return reader.read(f"{prefix}mlp.experts.{name}", box, tuple(full_shape))
        cols = box[-1]  # a stepped slice: only this half's columns are read
        half = slice(2 * cols.start + column, 2 * cols.stop, 2)
        return reader.read(f"{prefix}mlp.experts.{name}", (*box[:-1], half), (*full_shape[:-1], 2 * full_shape[-1]))


class KimiK2(DeepseekV3):
    """Kimi-K2: DeepSeek-V3's architecture (its config.json names DeepseekV3ForCausalLM) under its own
    model_type; it imports as DeepSeek-V3 and our export of it is a DeepSeek-V3 model."""

    model_type, title = "kimi_k2", "Kimi-K2"


FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (Mixtral(), Qwen2Moe(), Qwen3Moe(), DeepseekV3(), KimiK2(), Olmoe(), Glm4Moe(), GptOss())
}
"""Every family, by config.json's model_type."""


def family_of(m: ModelConfig, e: MoEConfig) -> Family:
    """The family whose structure our config has (by attention first, then partial rotary or sigmoid routing
    with shared experts, then q/k norms and the shared expert); its `rules` then say whether the rest maps."""
    if m.attention == "mla":
        return FAMILIES["deepseek_v3"]
    if m.attention_sinks or e.activation == "clamped_swiglu" or e.expert_biases:
        return FAMILIES["gpt_oss"]
    if m.partial_rotary_factor != 1 or (e.router == "sigmoid_topk" and e.num_shared_experts):
        return FAMILIES["glm4_moe"]
    if m.qk_norm != "none":
        return FAMILIES["olmoe" if m.qk_norm == "full" else "qwen3_moe"]
    if m.qkv_bias or e.num_shared_experts or e.shared_expert_gate:
        return FAMILIES["qwen2_moe"]
    return FAMILIES["mixtral"]
