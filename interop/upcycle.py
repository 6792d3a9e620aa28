"""Sparse upcycling: start an MoE from a dense Hugging Face Llama or Qwen3 checkpoint (train.upcycle=true).

Komatsuzaki et al. (2022) and Megatron-Core's `moe/upcycling_utils.py` are the reference: attention, norms,
embeddings and output are the dense model's, and every routed expert starts as the dense FFN, so the MoE
computes what the dense model does at step 0 and training only has to make the experts differ.

What maps (HF names under `model.layers.{i}.`; ours `[out, in]` like HF unless noted):
    attention.wq, wk        self_attn.q_proj, k_proj   rows permuted per head, HF rotate-half (i, i + Hd/2)
                                                       -> our adjacent pairs (2i, 2i+1) (moe/attention.py)
    attention.wv, wo        self_attn.v_proj, o_proj
    attention.q/k_head_norm self_attn.q_norm, k_norm   Qwen3 (model.qk_norm=head), permuted like one head
    attention_norm, ffn_norm  input_layernorm, post_attention_layernorm
    feed_forward.w1/w3/w2   mlp.gate_proj/up_proj/down_proj  dense blocks (model.first_dense_layers, moe_every)
    moe.experts.w1, w3 [E, D, F]   slice j of gate_proj / up_proj [I, D], transposed
    moe.experts.w2 [E, F, D]       slice j of down_proj [D, I], transposed
    moe.router.gate [E, D]         not in the dense model: initialised as below
  and model.embed_tokens, model.norm, lm_head (absent when tie_word_embeddings).

Granularity g (train.upcycle_granularity; Megatron's granular upcycling, He et al. 2024): the dense hidden
width I splits into g slices of F = I/g, and a SwiGLU is a sum over its hidden units, so
FFN(x) = sum_j FFN_j(x) exactly. The E experts are E/g copies of the g slices, copy-major: expert e = c*g + j
holds slice j (as Megatron lays them out), so expert parallelism keeps whole copies on a rank.

The router, and why the step-0 function is the dense one. Copy c's router row is a normal draw with
model.init_std (the one-process init of row c of a [E/g, D] tensor, keyed by the run's seed), and its g
experts share that row (Megatron's virtual-group init: its router takes the first E/g rows and repeats each
g times). Tied rows give tied scores, so top-k picks whole copies when moe.top_k is a multiple of g
(validation): each token takes k/g copies, every slice j once per copy. With normalised top-k weights
(softmax or sigmoid scores, moe.norm_topk_prob=true) the weights sum to one, every slice's weights to 1/g,
and the identical copies make the output sum_j FFN_j(x) / g; moe.route_scale = g (validation) restores
FFN(x). With g = 1 that is plain upcycling: any router works, since all experts are the same FFN.
Megatron scales the expert weights by g^(1/3) instead of the combine weights; that is exact only for a
positively homogeneous activation, and SiLU is not one, so we scale the combine weights (exact for SwiGLU).
Not zeros: a zero router ties every expert, every token would take the same top-k (torch.topk's tie order)
and only those experts would train until the balancing loss spread the tokens; random rows spread the tokens
from the first step. Parity also needs dropless routing (or no token over capacity); the aux-free selection
bias starts at zero. Shared experts are refused (the dense FFN becomes the routed ones).

Every rank reads only the boxes of the safetensors that its shards hold (`parallel.shards.shard_extent`), as
train/hf.py does for Mixtral; an expert shard reads each dense slice it needs once. No rank builds the
whole MoE, nor the whole dense FFN unless its shard holds one whole copy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from moeyard.interop.hf import SafetensorsReader
from moeyard.interop.hf_families import rope_overrides
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.init import init_slice_
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.shards import shard_extent

DENSE_FAMILIES = ("llama", "qwen3")
"""Hugging Face model_type values of the dense models that upcycle (LlamaForCausalLM, Qwen3ForCausalLM)."""
INDEX = "model.safetensors.index.json"
_Read = Callable[[str, tuple[slice, ...], torch.Size], torch.Tensor]
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_head_norm.weight": "self_attn.q_norm.weight",
    "attention.k_head_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_ROPE_ROWS = {
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.q_head_norm.weight",
    "attention.k_head_norm.weight",
}
"""Our tensors whose rows are permuted within each head between HF's RoPE and ours."""
_EXPERTS = {"w1": "mlp.gate_proj.weight", "w3": "mlp.up_proj.weight", "w2": "mlp.down_proj.weight"}
_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
)

DEFAULT_ROPE_THETA = 10000.0
"""transformers' RoPE base when a Llama or Qwen3 config.json names none."""


def _config_json(hf_dir: Path) -> dict | None:
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return hf if isinstance(hf, dict) else None


def dense_model_type(path: str | Path) -> str | None:
    """The model_type of a Hugging Face directory of a dense family that upcycles, else None."""
    hf = _config_json(Path(path))
    if hf is None or (Path(path) / "meta.json").exists() or hf.get("model_type") not in DENSE_FAMILIES:
        return None
    return hf["model_type"]


def is_dense_dir(path: str | Path) -> bool:
    """A Hugging Face directory of a dense family that upcycles (its config.json's model_type says so)."""
    return dense_model_type(path) is not None


def read_dense_config(hf_dir: Path, field: str = "train.init_from") -> dict:
    """config.json of a dense Llama/Qwen3 directory; ValueError (one line) for anything that does not map."""
    hf = _config_json(hf_dir)
    where = f"{field}={hf_dir}"
    if hf is None:
        raise ValueError(f"{where}: config.json is missing or corrupt (rule: a Hugging Face directory has one)")
    if hf.get("model_type") not in DENSE_FAMILIES:
        raise ValueError(
            f"{where}: model_type={hf.get('model_type')} (rule: train.upcycle reads a dense "
            f"{' or '.join(DENSE_FAMILIES)} model)"
        )
    missing = [key for key in _REQUIRED if key not in hf]
    if missing:
        raise ValueError(f"{where}: config.json lacks {', '.join(missing)} (rule: a complete dense config)")
    try:
        rope_overrides(hf, DEFAULT_ROPE_THETA)  # default or YaRN RoPE (Llama 3's llama3 scaling is refused)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    refusals = [
        (not hf.get("attention_bias", False), "attention_bias", hf.get("attention_bias"), "false"),
        (not hf.get("mlp_bias", False), "mlp_bias", hf.get("mlp_bias"), "false"),
        (hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "silu (SwiGLU)"),
        (
            not hf.get("use_sliding_window", False),
            "use_sliding_window",
            hf.get("use_sliding_window"),
            "false (moeyard attends to the whole sequence)",
        ),
    ]
    for ok, key, value, rule in refusals:
        if not ok:
            raise ValueError(f"{where}: {key}={value} (rule: must be {rule} to upcycle)")
    return hf


def dense_overrides(hf: dict) -> dict[str, object]:
    """The model config of a dense checkpoint, as Hydra override keys (add moe.* and train.upcycle=true)."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return {
        "model.name": f"{hf['model_type']}_upcycled",
        "model.vocab_size": hf["vocab_size"],
        "model.dim": hf["hidden_size"],
        "model.n_layers": hf["num_hidden_layers"],
        "model.n_heads": heads,
        "model.n_kv_heads": hf.get("num_key_value_heads") or heads,
        "model.head_dim_override": None if head_dim * heads == hf["hidden_size"] else head_dim,
        "model.ffn_hidden": hf["intermediate_size"],
        "model.max_seq_len": hf.get("max_position_embeddings", 2048),
        **rope_overrides(hf, DEFAULT_ROPE_THETA),
        "model.norm_eps": hf["rms_norm_eps"],
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "model.attention": "gqa",
        "model.qk_norm": "head" if hf["model_type"] == "qwen3" else "none",
        "model.qkv_bias": False,
    }


_UNCHECKED = ("model.name", "model.max_seq_len", "model.ffn_hidden")
"""Override keys the model may choose freely (ffn_hidden matters only with dense blocks: checked apart)."""


def check_dense_dir(hf_dir: Path, model: ModelConfig, moe: MoEConfig, granularity: int, field: str) -> None:
    """The dense weights exist and fit the MoE config: its attention, norms and vocabulary are the dense
    model's, and g experts of width moe.expert_hidden tile the dense FFN (ValueError naming the field)."""
    hf = read_dense_config(hf_dir, field)
    where = f"config.json of {field}={hf_dir}"
    for key, want in dense_overrides(hf).items():
        ours = getattr(model, key.split(".", 1)[1])
        if key not in _UNCHECKED and ours != want:
            raise ValueError(f"{key}={ours} must be {want} as {where} gives (rule: upcycling keeps the dense model)")
    width = hf["intermediate_size"]
    if moe.expert_hidden * granularity != width:
        raise ValueError(
            f"moe.expert_hidden={moe.expert_hidden} x train.upcycle_granularity={granularity} must equal "
            f"intermediate_size={width} of {where} (rule: g experts of width I/g tile the dense FFN)"
        )
    has_dense = any(not model.is_moe_layer(i) for i in range(model.n_layers))
    if has_dense and model.ffn_hidden != width:
        raise ValueError(
            f"model.ffn_hidden={model.ffn_hidden} must equal intermediate_size={width} of {where} (rule: dense "
            "blocks, model.first_dense_layers/moe_every, keep the dense FFN)"
        )
    if not (hf_dir / INDEX).is_file() and not (hf_dir / "model.safetensors").is_file():
        raise ValueError(f"{field}={hf_dir} has no {INDEX} or model.safetensors (rule: weights as safetensors)")


def _rope_rows(hf_name: str, full_shape: torch.Size, box: tuple[slice, ...], read: _Read, hd: int) -> torch.Tensor:
    """Rows `box[0]` of a per-head tensor (q/k projection or head norm) in our RoPE order: the whole heads the
    rows fall in are read, each head's rows go HF (i, i + hd/2) -> ours (2i, 2i+1), and the box is cut out.
    Whole heads, because a box may cut a head's rows where the HF layout splits them in halves."""
    first, last = box[0].start // hd, -(-box[0].stop // hd)
    rows = read(hf_name, (slice(first * hd, last * hd), *box[1:]), full_shape)
    ours = rows.reshape(last - first, 2, hd // 2, -1).transpose(1, 2).reshape(rows.shape)
    start = box[0].start - first * hd
    return ours[start : start + box[0].stop - box[0].start]


def _expert_part(
    prefix: str, w: str, full_shape: torch.Size, box: tuple[slice, ...], read: _Read, g: int
) -> torch.Tensor:
    """Experts box[0] of our stacked w1/w3 [E, D, F] or w2 [E, F, D]: expert e is slice j = e % g of the
    dense matrix, transposed; each slice is read once (only the box's rows and columns of it)."""
    if w == "w2":  # down_proj [D, I]: our [F, D] block of slice j is its columns j*F + box[1], transposed
        (F, D), f_box, d_box = full_shape[1:], box[1], box[2]
    else:  # gate_proj / up_proj [I, D]: our [D, F] block of slice j is its rows j*F + box[2], transposed
        (D, F), d_box, f_box = full_shape[1:], box[1], box[2]
    hf_shape = torch.Size((D, F * g) if w == "w2" else (F * g, D))
    slices: dict[int, torch.Tensor] = {}
    for j in sorted({e % g for e in range(box[0].start, box[0].stop)}):
        rows = slice(j * F + f_box.start, j * F + f_box.stop)
        hf_box = (d_box, rows) if w == "w2" else (rows, d_box)
        slices[j] = read(prefix + _EXPERTS[w], hf_box, hf_shape).T
    return torch.stack([slices[e % g] for e in range(box[0].start, box[0].stop)])


def _router_rows(
    name: str, full_shape: torch.Size, box: tuple[slice, ...], g: int, m: ModelConfig, seed: int
) -> torch.Tensor:
    """Rows box[0], columns box[1] of the router [E, D]: expert e gets row c = e // g of the one-process
    normal init of a [E/g, D] tensor named like the router (with g = 1, the router's own init)."""
    E, D = full_shape
    first, last = box[0].start // g, (box[0].stop - 1) // g + 1
    copies = torch.empty(last - first, box[1].stop - box[1].start)
    init_slice_(copies, name, (E // g, D), (first, box[1].start), m, seed)
    start = box[0].start - first * g
    return copies.repeat_interleave(g, dim=0)[start : start + box[0].stop - box[0].start]


def read_upcycled_part(
    name: str,
    full_shape: torch.Size,
    offset: tuple[int, ...],
    shape: torch.Size,
    read: _Read,
    m: ModelConfig,
    g: int,
    seed: int,
) -> torch.Tensor:
    """The box [offset, offset + shape) of our tensor `name` (full shape `full_shape`) of the upcycled MoE."""
    box = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    if name in _TOP:
        return read(_TOP[name], box, full_shape)
    _, lid, rest = name.split(".", 2)
    prefix = f"model.layers.{lid}."
    if rest == "moe.router.gate.weight":
        return _router_rows(name, full_shape, box, g, m, seed)
    if rest.startswith("moe.experts.w"):
        return _expert_part(prefix, rest.rsplit(".", 1)[-1], full_shape, box, read, g)
    if rest in _ROPE_ROWS:
        return _rope_rows(prefix + _LAYER[rest], full_shape, box, read, m.head_dim)
    return read(prefix + _LAYER[rest], box, full_shape)


@torch.no_grad()
def load_upcycled_weights(pm, hf_dir: Path, model: ModelConfig, moe: MoEConfig, seed: int) -> None:
    """Fills this rank's shards of every parameter (any layout) from a dense Llama/Qwen3 directory, reading
    only the boxes of the dense tensors that those shards hold; the router as the module docstring says."""
    hf = read_dense_config(hf_dir, "train.init_from")
    g = hf["intermediate_size"] // moe.expert_hidden
    assert g * moe.expert_hidden == hf["intermediate_size"] and moe.num_experts % g == 0, (g, moe)
    assert moe.num_shared_experts == 0, "validation refuses shared experts with train.upcycle"
    reader = SafetensorsReader(hf_dir)
    try:
        for name, t in ckpt.model_tensors(pm):
            if name.endswith("expert_bias"):
                t.zero_()
                continue
            full_shape, offset, local = shard_extent(name, t, pm.dims, pm.expert_mesh)
            if local.numel():
                local.copy_(read_upcycled_part(name, full_shape, offset, local.shape, reader.read, model, g, seed))
    finally:
        reader.close()
