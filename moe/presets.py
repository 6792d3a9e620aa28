"""Model presets and routing recipes, defined once, as Python objects beside the model.

A `Routing` recipe is a way to route (DeepSeek-V3's aux-loss-free sigmoid, GShard's capacity, ...); a
`Preset` is a published model's shape with the recipe it routes by. Each states only the fields that differ
from the dataclass defaults (tests/unit/test_presets.py fails on a restated default, and on a preset that
writes out a recipe's values instead of naming it). The same objects serve Hydra and plain Python:

    moeyard train model=deepseek_v3 moe=gshard     # job/presets.py stores them as config-group options
    PRESETS["mixtral_8x7b"].model_config()          # the benchmarks, which run where Hydra is not installed

`moe=<recipe>` decides the routing: every field of ROUTING_DECISIONS takes the recipe's value, or its
default where the recipe states none, so the model preset's balancing does not leak into another recipe.
The preset keeps its shape, its route scale and its expert groups; `moe=default` keeps its routing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from moeyard.moe.config import ModelConfig, MoEConfig

ROUTING_DECISIONS = (
    "router",
    "norm_topk_prob",
    "capacity_factor",
    "drop_policy",
    "aux_loss_coef",
    "seq_aux_loss_coef",
    "z_loss_coef",
    "bias_update_rate",
)
"""The MoEConfig fields a routing recipe decides as a whole (a recipe may also fix top_k)."""


def _frozen(values: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(values))


@dataclass(frozen=True)
class Routing:
    """A routing recipe: the MoEConfig fields it sets, where they differ from the defaults."""

    about: str
    moe: Mapping[str, Any] = field(default_factory=dict)
    top_k: int | None = None
    """Experts per token, where the recipe fixes it (GShard 2, Switch 1); None keeps the model preset's."""

    def decided(self) -> dict[str, Any]:
        """Every field of ROUTING_DECISIONS (the recipe's value, else the default), and top_k if it fixes it."""
        top_k = {} if self.top_k is None else {"top_k": self.top_k}
        return {**{name: default_of(MoEConfig, name) for name in ROUTING_DECISIONS}, **self.moe, **top_k}


@dataclass(frozen=True)
class Preset:
    """A named model: the ModelConfig and MoEConfig fields that differ from the defaults, and its recipe."""

    about: str
    model: Mapping[str, Any] = field(default_factory=dict)
    moe: Mapping[str, Any] = field(default_factory=dict)
    """Shape, route scale and expert groups; the routing decisions come from `routing`."""
    routing: str = "default"

    def moe_fields(self) -> dict[str, Any]:
        """The MoEConfig fields this preset sets: its recipe's, then its own."""
        recipe = ROUTINGS[self.routing]
        top_k = {} if recipe.top_k is None else {"top_k": recipe.top_k}
        return {**recipe.moe, **top_k, **self.moe}

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(**self.moe_fields())


def default_of(cls: type, name: str) -> Any:
    """The dataclass default of field `name` of `cls` (every field of ModelConfig and MoEConfig has one)."""
    return next(f.default for f in fields(cls) if f.name == name)


ROUTINGS: dict[str, Routing] = {
    "default": Routing("The model preset's own routing."),
    "deepseek": Routing(
        "DeepSeek-V3 balancing: sigmoid scores, aux-loss-free bias updates, a small sequence-level loss.",
        _frozen(
            {
                "router": "sigmoid_topk",
                "aux_loss_coef": 0.0,
                "seq_aux_loss_coef": 0.0001,
                "z_loss_coef": 0.0,
                "bias_update_rate": 0.001,
            }
        ),
    ),
    "expert_choice": Routing(
        "Expert-choice routing: each expert takes its top ceil(cf * S * K / E) tokens of every sequence.",
        _frozen({"router": "expert_choice", "capacity_factor": 1.0, "aux_loss_coef": 0.0}),
    ),
    "gshard": Routing(
        "GShard: top-2 softmax routing with capacity factor 2, tokens dropped by position.",
        _frozen({"capacity_factor": 2.0, "drop_policy": "position"}),
        top_k=2,
    ),
    "olmoe": Routing(
        "OLMoE: softmax over all experts, top-k weights used as they are (no renormalisation), load-balancing "
        "loss 0.01 and router z-loss 0.001.",
        _frozen({"norm_topk_prob": False}),
    ),
    "qwen3": Routing(
        "Qwen3-MoE: softmax over all experts, top-k renormalised to sum to one, a small batch-level "
        "load-balancing loss and no z-loss.",
        _frozen({"aux_loss_coef": 0.001, "z_loss_coef": 0.0}),
    ),
    "switch": Routing(
        "Switch Transformer: top-1 softmax routing, capacity factor 1.25, lowest-probability tokens dropped.",
        _frozen({"norm_topk_prob": False, "capacity_factor": 1.25}),
        top_k=1,
    ),
}
"""Routing recipes by name: the `moe=` options."""

_GPT_OSS_MODEL = {  # what gpt-oss-20b and -120b share (their published config.json files)
    "vocab_size": 201088,
    "dim": 2880,
    "n_heads": 64,
    "n_kv_heads": 8,
    "head_dim_override": 64,
    "qkv_bias": True,
    "o_bias": True,
    "attention_sinks": True,
    "sliding_window": 128,
    "ffn_hidden": 2880,
    "max_seq_len": 131072,
    "rope_theta": 150000.0,
    "rope_scaling": "yarn",
    "yarn_factor": 32.0,
    "yarn_truncate": False,
    "yarn_mscale": 0.0,  # as config.json (no mscale key) imports; either gives the temperature m(32, 1)
}
_GPT_OSS_MOE = {
    "top_k": 4,
    "expert_hidden": 2880,
    "router_bias": True,
    "expert_biases": True,
    "activation": "clamped_swiglu",
}

PRESETS: dict[str, Preset] = {
    "debug": Preset(
        "Tiny model for tests and golden layout checks: 4 blocks, 8 experts of width 32.",
        moe=_frozen({"expert_hidden": 32}),
    ),
    "demo": Preset(
        "Small CPU demo: about 2.6 M parameters (0.9 M active per token), learns Python source in minutes.",
        model=_frozen(
            {
                "name": "demo",
                "dim": 128,
                "n_heads": 8,
                "n_kv_heads": 4,
                "ffn_hidden": 384,
                "max_seq_len": 256,
                "first_dense_layers": 1,
            }
        ),
        moe=_frozen({"expert_hidden": 128, "num_shared_experts": 1}),
    ),
    "mixtral_8x7b": Preset(
        "Mixtral-8x7B shape (46.7 B parameters, 12.9 B active): 32 blocks, 8 experts, top-2 softmax routing.",
        model=_frozen(
            {
                "name": "mixtral_8x7b",
                "vocab_size": 32000,
                "dim": 4096,
                "n_layers": 32,
                "n_heads": 32,
                "n_kv_heads": 8,
                "ffn_hidden": 14336,
                "max_seq_len": 32768,
                "rope_theta": 1000000.0,
            }
        ),
        moe=_frozen({"expert_hidden": 14336, "aux_loss_coef": 0.02}),
    ),
    "qwen3_30b_a3b": Preset(
        "Qwen3-30B-A3B shape (30.5 B parameters, 3.3 B active): 48 blocks, all MoE; grouped-query attention "
        "with 32 query and 4 key/value heads of width 128 (4096 > dim 2048) and a per-head q/k RMSNorm; 128 "
        "experts, top-8 softmax routing renormalised over the chosen 8, no shared expert. ffn_hidden is unused "
        "(every block is MoE).",
        model=_frozen(
            {
                "name": "qwen3_30b_a3b",
                "vocab_size": 151936,
                "dim": 2048,
                "n_layers": 48,
                "n_heads": 32,
                "n_kv_heads": 4,
                "head_dim_override": 128,
                "qk_norm": "head",
                "ffn_hidden": 6144,
                "max_seq_len": 40960,
                "rope_theta": 1000000.0,
                "norm_eps": 1.0e-06,
            }
        ),
        moe=_frozen({"num_experts": 128, "top_k": 8, "expert_hidden": 768}),
        routing="qwen3",
    ),
    "olmoe_1b_7b": Preset(
        "OLMoE-1B-7B shape (6.9 B parameters, 1.3 B active): 16 blocks, all MoE; 16-head attention with an "
        "RMSNorm of q and k over their full width (all heads together); 64 experts, top-8 softmax routing "
        "without renormalisation, load-balancing and router z-losses as in the OLMoE paper. ffn_hidden is "
        "unused (every block is MoE).",
        model=_frozen(
            {
                "name": "olmoe_1b_7b",
                "vocab_size": 50304,
                "dim": 2048,
                "n_layers": 16,
                "n_heads": 16,
                "n_kv_heads": 16,
                "qk_norm": "full",
                "ffn_hidden": 1024,
                "max_seq_len": 4096,
            }
        ),
        moe=_frozen({"num_experts": 64, "top_k": 8, "expert_hidden": 1024}),
        routing="olmoe",
    ),
    "deepseek_v3": Preset(
        "DeepSeek-V3 shape (671 B parameters without the multi-token-prediction module, 37 B active; "
        "model.mtp_layers=1 adds it: 682.6 B, the published 685 B with the copies of the embedding and head and "
        "the FP8 scales the Hugging Face checkpoint stores): 61 "
        "blocks (first 3 dense) with multi-head latent attention, 256 fine-grained routed experts + 1 shared, "
        "top-8 sigmoid routing limited to 4 of 8 groups, aux-loss-free bias balancing plus a small "
        "sequence-level loss. Default RoPE at the 4K pre-training context; the published 128K model adds YaRN "
        "(model.rope_scaling=yarn, yarn_factor=40, yarn_original_max_seq_len=4096, yarn_mscale=1, "
        "yarn_mscale_all_dim=1, max_seq_len=163840). n_kv_heads is unused by MLA (every head has its own keys "
        "and values).",
        model=_frozen(
            {
                "name": "deepseek_v3",
                "vocab_size": 129280,
                "dim": 7168,
                "n_layers": 61,
                "n_heads": 128,
                "n_kv_heads": 128,
                "ffn_hidden": 18432,
                "max_seq_len": 4096,
                "norm_eps": 1.0e-06,
                "first_dense_layers": 3,
                "attention": "mla",
                "q_lora_rank": 1536,
            }
        ),
        moe=_frozen(
            {
                "num_experts": 256,
                "top_k": 8,
                "expert_hidden": 2048,
                "num_shared_experts": 1,
                "route_scale": 2.5,
                "n_groups": 8,
                "topk_groups": 4,
            }
        ),
        routing="deepseek",
    ),
    "glm4_5_air": Preset(
        "GLM-4.5-Air shape (106.9 B parameters without its multi-token-prediction layer, published as 106 B; "
        "12.2 B active besides the input embedding, published as 12 B): 46 blocks (the first dense); "
        "grouped-query attention with 96 query and 8 key/value heads of width 128, q/k/v biases, RoPE on the "
        "first half of each head; 128 routed experts + 1 shared, top-8 sigmoid routing with an aux-free bias.",
        model=_frozen(
            {
                "name": "glm4_5_air",
                "vocab_size": 151552,
                "dim": 4096,
                "n_layers": 46,
                "n_heads": 96,
                "n_kv_heads": 8,
                "head_dim_override": 128,
                "partial_rotary_factor": 0.5,
                "qkv_bias": True,
                "ffn_hidden": 10944,
                "max_seq_len": 131072,
                "rope_theta": 1000000.0,
                "first_dense_layers": 1,
            }
        ),
        moe=_frozen({"num_experts": 128, "top_k": 8, "expert_hidden": 1408, "num_shared_experts": 1}),
        routing="deepseek",
    ),
    "glm4_5": Preset(
        "GLM-4.5 shape (352.8 B parameters without its multi-token-prediction layer, 356.8 B with it, "
        "published as 355 B; 32.1 B active besides the input embedding, published as 32 B): 92 blocks (first "
        "3 dense); GLM-4.5-Air's attention plus a per-head q/k RMSNorm; 160 routed experts + 1 shared, top-8 "
        "sigmoid routing scaled by 2.5 with an aux-free bias.",
        model=_frozen(
            {
                "name": "glm4_5",
                "vocab_size": 151552,
                "dim": 5120,
                "n_layers": 92,
                "n_heads": 96,
                "n_kv_heads": 8,
                "head_dim_override": 128,
                "partial_rotary_factor": 0.5,
                "qkv_bias": True,
                "qk_norm": "head",
                "ffn_hidden": 12288,
                "max_seq_len": 131072,
                "rope_theta": 1000000.0,
                "first_dense_layers": 3,
            }
        ),
        moe=_frozen(
            {"num_experts": 160, "top_k": 8, "expert_hidden": 1536, "num_shared_experts": 1, "route_scale": 2.5}
        ),
        routing="deepseek",
    ),
    "gpt_oss_20b": Preset(
        "gpt-oss-20b shape (20.9 B parameters, as published): 24 blocks, every one MoE; grouped-query attention "
        "with 64 query and 8 key/value heads of width 64, q/k/v/o biases and per-head attention sinks, the even "
        "blocks sliding over 128 positions; YaRN x32 from 4096 positions (untruncated ramp); 32 experts with "
        "biases and the clamped SwiGLU, top-4 from a biased router.",
        model=_frozen({"name": "gpt_oss_20b", **_GPT_OSS_MODEL, "n_layers": 24}),
        moe=_frozen({**_GPT_OSS_MOE, "num_experts": 32}),
    ),
    "gpt_oss_120b": Preset(
        "gpt-oss-120b shape (116.8 B parameters, as published): gpt-oss-20b's blocks, 36 of them, with 128 "
        "experts each.",
        model=_frozen({"name": "gpt_oss_120b", **_GPT_OSS_MODEL, "n_layers": 36}),
        moe=_frozen({**_GPT_OSS_MOE, "num_experts": 128}),
    ),
}
"""Model presets by name: the `model=` options."""
