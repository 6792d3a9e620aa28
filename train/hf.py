"""Hugging Face interop: export a checkpoint as Mixtral safetensors, and train from Mixtral weights.

Which configs map: the softmax top-k family with one expert type is Mixtral (`MixtralForCausalLM`):
moe.router=softmax_topk with norm_topk_prob=true and route_scale=1, no shared experts, no group-limited
routing, no aux-free bias, and every block MoE (model.first_dense_layers=0, model.moe_every=1). Anything
else (sigmoid/DeepSeek-V3 routing, shared experts, dense blocks, expert-choice) is refused with the field
that does not map. HF Mixtral is dropless: a model trained with moe.capacity_factor exports, and its logits
match ours whenever no token is dropped.

Conventions that differ and how the export bridges them:
- Our expert weights are stacked [E, D, F] (w1, w3) and [E, F, D] (w2) used as x @ w; HF's per-expert
  Linear weights are [out, in]: each expert's matrix is transposed.
- Our RoPE rotates interleaved channel pairs (2i, 2i+1); HF's rotate_half rotates (i, i + head_dim/2), with
  the same frequencies. Permuting each head's rows of q_proj and k_proj maps one onto the other (attention
  scores do not change when q and k channels share a permutation), as Meta's Llama weights are converted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import save_file

from moe.config import ModelConfig, MoEConfig
from moe.model import Transformer
from parallel import checkpoint as ckpt
from parallel.data_parallel import is_expert_param
from parallel.safe_metadata import SafeFileSystemReader

INDEX = "model.safetensors.index.json"
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "moe.router.gate.weight": "block_sparse_moe.gate.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def check_exportable(m: ModelConfig, e: MoEConfig) -> None:
    """Raises ValueError naming the first field that keeps the model out of the Mixtral layout."""
    rules = [
        (e.router == "softmax_topk", "moe.router", e.router, "must be softmax_topk"),
        (
            e.norm_topk_prob,
            "moe.norm_topk_prob",
            e.norm_topk_prob,
            "must be true (Mixtral renormalises top-k)",
        ),
        (e.route_scale == 1.0, "moe.route_scale", e.route_scale, "must be 1.0"),
        (
            e.num_shared_experts == 0,
            "moe.num_shared_experts",
            e.num_shared_experts,
            "must be 0 (one expert type)",
        ),
        (e.n_groups == 1, "moe.n_groups", e.n_groups, "must be 1 (no group-limited routing)"),
        (
            e.bias_update_rate == 0,
            "moe.bias_update_rate",
            e.bias_update_rate,
            "must be 0 (no selection bias)",
        ),
        (
            m.first_dense_layers == 0,
            "model.first_dense_layers",
            m.first_dense_layers,
            "must be 0 (all blocks MoE)",
        ),
        (m.moe_every == 1, "model.moe_every", m.moe_every, "must be 1 (all blocks MoE)"),
    ]
    for ok, field, value, rule in rules:
        if not ok:
            raise ValueError(f"{field}={value} has no Hugging Face Mixtral equivalent (rule: {rule} to export)")


def _rope_rows_to_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head, rows (2i, 2i+1) -> (i, i + hd/2)."""
    return w.reshape(heads, -1, 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def _rope_rows_from_hf(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, 2, -1, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def to_hf(name: str, t: torch.Tensor, m: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors for our full tensor `name`."""
    if name in _TOP:
        return {_TOP[name]: t}
    _, lid, rest = name.split(".", 2)
    prefix = f"model.layers.{lid}."
    if rest.startswith("moe.experts.w"):
        w = rest.rsplit(".", 1)[-1]
        return {f"{prefix}block_sparse_moe.experts.{e}.{w}.weight": t[e].T.contiguous() for e in range(t.shape[0])}
    if rest == "attention.wq.weight":
        t = _rope_rows_to_hf(t, m.n_heads)
    elif rest == "attention.wk.weight":
        t = _rope_rows_to_hf(t, m.n_kv_heads)
    return {prefix + _LAYER[rest]: t}


def from_hf(name: str, get: Callable[[str], torch.Tensor], m: ModelConfig, e: MoEConfig) -> torch.Tensor:
    """Our full tensor `name` from HF tensors (`get` reads one by HF name)."""
    if name in _TOP:
        return get(_TOP[name])
    _, lid, rest = name.split(".", 2)
    prefix = f"model.layers.{lid}."
    if rest.startswith("moe.experts.w"):
        w = rest.rsplit(".", 1)[-1]
        return torch.stack([get(f"{prefix}block_sparse_moe.experts.{i}.{w}.weight").T for i in range(e.num_experts)])
    t = get(prefix + _LAYER[rest])
    if rest == "attention.wq.weight":
        return _rope_rows_from_hf(t, m.n_heads)
    if rest == "attention.wk.weight":
        return _rope_rows_from_hf(t, m.n_kv_heads)
    return t


def hf_config(m: ModelConfig, e: MoEConfig, dtype: str) -> dict:
    """config.json of MixtralForCausalLM (rope_theta flat for transformers 4, nested for 5)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": m.vocab_size,
        "hidden_size": m.dim,
        "intermediate_size": e.expert_hidden,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "num_experts_per_tok": e.top_k,
        "num_local_experts": e.num_experts,
        "output_router_logits": False,
        "router_aux_loss_coef": e.aux_loss_coef,
        "router_jitter_noise": 0.0,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": None,  # the byte tokenizer's separator is 0
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _full_shapes(m: ModelConfig, e: MoEConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = Transformer(m, e)
    return {name: p.shape for name, p in model.named_parameters()}


def export(source: Path, out: Path, dtype: str = "float32") -> Path:
    """Writes the checkpoint `source` (a step_N dir or a run dir) to `out` as Mixtral safetensors.

    One shard per block (plus one for embeddings and one for the head), so memory stays at one block.
    Written into OUT.tmp and renamed, so an interrupted export leaves no half-written OUT.
    """
    path, meta = ckpt.resolve(str(source), source, "export")
    m, e = ModelConfig(**meta["model"]), MoEConfig(**meta["moe"])
    check_exportable(m, e)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out={out} exists and is not empty (rule: export into a new or empty directory)")
    shapes = _full_shapes(m, e)
    groups = [[n for n in shapes if n == "tok_embeddings.weight"]]
    groups += [[n for n in shapes if n.startswith(f"layers.{i}.")] for i in range(m.n_layers)]
    groups += [[n for n in shapes if n in ("norm.weight", "output.weight")]]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        state = {f"model.{n}": torch.empty(shapes[n]) for n in names}
        with ckpt.single_process_quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(path), no_dist=True)
        tensors = {
            k: v.to(getattr(torch, dtype)).contiguous()
            for n in names
            for k, v in to_hf(n, state[f"model.{n}"], m).items()
        }
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(hf_config(m, e, dtype), indent=1))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return path


# --- import -------------------------------------------------------------------------------------------------


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "num_local_experts",
    "num_experts_per_tok",
)


def read_hf_config(hf_dir: Path, field: str) -> dict:
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{field}={hf_dir}: config.json is missing or corrupt ({type(err).__name__}) "
            "(rule: a Hugging Face model directory has a config.json)"
        ) from None
    if hf.get("model_type") != "mixtral":
        raise ValueError(
            f"{field}={hf_dir}: model_type={hf.get('model_type')} (rule: moeyard imports Mixtral "
            "weights, model_type=mixtral)"
        )
    missing = [key for key in _REQUIRED if key not in hf]
    if missing:
        raise ValueError(f"{field}={hf_dir}: config.json lacks {', '.join(missing)} (rule: a Mixtral config)")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise ValueError(f"{field}={hf_dir}: head_dim={head_dim} (rule: must be hidden_size/num_attention_heads)")
    if hf.get("sliding_window") is not None:
        raise ValueError(
            f"{field}={hf_dir}: sliding_window={hf['sliding_window']} (rule: moeyard attends to the "
            "whole sequence; sliding_window must be null)"
        )
    return hf


def overrides_from_hf(hf: dict) -> dict[str, object]:
    """The model/moe config of Mixtral weights, as Hydra override keys."""
    rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 1e6))
    return {
        "model.name": "mixtral_import",
        "model.vocab_size": hf["vocab_size"],
        "model.dim": hf["hidden_size"],
        "model.n_layers": hf["num_hidden_layers"],
        "model.n_heads": hf["num_attention_heads"],
        "model.n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
        "model.max_seq_len": hf["max_position_embeddings"],
        "model.rope_theta": float(rope),
        "model.norm_eps": hf["rms_norm_eps"],
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "model.first_dense_layers": 0,
        "model.moe_every": 1,
        "moe.num_experts": hf["num_local_experts"],
        "moe.top_k": hf["num_experts_per_tok"],
        "moe.expert_hidden": hf["intermediate_size"],
        "moe.router": "softmax_topk",
        "moe.norm_topk_prob": True,
        "moe.route_scale": 1.0,
        "moe.num_shared_experts": 0,
        "moe.n_groups": 1,
        "moe.bias_update_rate": 0.0,
    }


def check_hf_dir(hf_dir: Path, model: ModelConfig, moe: MoEConfig, field: str) -> None:
    """The weights exist and their shape fields agree with the config (ValueError naming the field)."""
    hf = read_hf_config(hf_dir, field)
    sections = {"model": model, "moe": moe}
    for key, value in overrides_from_hf(hf).items():
        section, name = key.split(".")
        ours = getattr(sections[section], name)
        if name in ckpt.SHAPE_FIELDS.get(section, ()) and ours != value:
            raise ValueError(
                f"{field}={hf_dir}: config.json gives {key}={value}, this config {ours} "
                "(rule: the model shape must match the weights; `moeyard import DIR` sets it)"
            )
    if not (hf_dir / INDEX).is_file() and not (hf_dir / "model.safetensors").is_file():
        raise ValueError(f"{field}={hf_dir} has no {INDEX} or model.safetensors (rule: weights as safetensors)")


class _SafetensorsDir:
    """Reads tensors by name from model.safetensors or an indexed set of shards, one at a time."""

    def __init__(self, hf_dir: Path) -> None:
        self.dir = hf_dir
        if (hf_dir / INDEX).is_file():
            self.files = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        else:
            with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"train.init_from={self.dir} lacks tensor {name} (rule: complete Mixtral weights)")
        with safe_open(str(self.dir / self.files[name]), framework="pt") as f:
            return f.get_tensor(name).float()


@torch.no_grad()
def load_hf_weights(pm, hf_dir: Path, model: ModelConfig, moe: MoEConfig) -> None:
    """Fills this rank's shards of every parameter from Mixtral safetensors (any layout)."""
    reader = _SafetensorsDir(hf_dir)
    for name, t in ckpt.model_tensors(pm):
        if name.endswith("expert_bias"):
            t.zero_()
            continue
        full = from_hf(name, reader.get, model, moe)
        ckpt.copy_full(pm, name, t, full, expert=is_expert_param(name))
