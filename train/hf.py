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

Neither direction holds more than one tensor: export streams one checkpoint entry at a time into its
safetensors file, and import reads, per rank, only the slices of the HF tensors that its shards hold.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.metadata import Metadata

from moe.config import ModelConfig, MoEConfig
from moe.model import Transformer
from parallel import checkpoint as ckpt
from parallel.safe_metadata import SafeFileSystemReader
from parallel.shards import shard_extent

INDEX = "model.safetensors.index.json"
_Read = Callable[[str, tuple[slice, ...], torch.Size], torch.Tensor]
_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "moe.router.gate.weight": "block_sparse_moe.gate.weight",
}
_ROPE_ROWS = {"attention.wq.weight": "n_heads", "attention.wk.weight": "n_kv_heads"}
"""Projections whose rows are permuted per head between our RoPE and HF's, and their head-count field."""
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


def to_hf(name: str, t: torch.Tensor, m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors for our full tensor `name`, one at a time (an expert stack gives one per expert, as views)."""
    if name in _TOP:
        yield _TOP[name], t
        return
    _, lid, rest = name.split(".", 2)
    prefix = f"model.layers.{lid}."
    if rest.startswith("moe.experts.w"):
        w = rest.rsplit(".", 1)[-1]
        for e in range(t.shape[0]):
            yield f"{prefix}block_sparse_moe.experts.{e}.{w}.weight", t[e].T
        return
    if rest in _ROPE_ROWS:
        t = _rope_rows_to_hf(t, getattr(m, _ROPE_ROWS[rest]))
    yield prefix + _LAYER[rest], t


def read_hf_part(
    name: str, full_shape: torch.Size, offset: tuple[int, ...], shape: torch.Size, read: _Read, m: ModelConfig
) -> torch.Tensor:
    """The box [offset, offset + shape) of our tensor `name` (full shape `full_shape`) from HF tensors;
    `read(hf_name, box, hf_full_shape)` reads only the given box of one HF tensor.

    Experts: only the box's experts, each HF [out, in] matrix read at the transposed box. q/k projections:
    rows are permuted within each head, so the whole heads that the box's rows fall in are read (the local
    shard's heads only), permuted, and cut to the box.
    """
    box = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
    if name in _TOP:
        return read(_TOP[name], box, full_shape)
    _, lid, rest = name.split(".", 2)
    prefix = f"model.layers.{lid}."
    if rest.startswith("moe.experts.w"):
        w = rest.rsplit(".", 1)[-1]
        hf_shape = torch.Size((full_shape[2], full_shape[1]))
        experts = range(box[0].start, box[0].stop)
        parts = [read(f"{prefix}block_sparse_moe.experts.{e}.{w}.weight", (box[2], box[1]), hf_shape) for e in experts]
        return torch.stack([part.T for part in parts])
    hf_name = prefix + _LAYER[rest]
    if rest not in _ROPE_ROWS:
        return read(hf_name, box, full_shape)
    hd = m.head_dim
    first, last = box[0].start // hd, -(-box[0].stop // hd)  # the heads the rows fall in
    rows = read(hf_name, (slice(first * hd, last * hd), box[1]), full_shape)
    start = box[0].start - first * hd
    return _rope_rows_from_hf(rows, last - first)[start : start + shape[0]]


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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}


def write_safetensors(
    path: Path, layout: list[tuple[str, torch.Size]], dtype: torch.dtype, tensors: Iterator[tuple[str, torch.Tensor]]
) -> int:
    """Writes a safetensors file holding `layout`'s tensors (name, shape) as `dtype`, taking them one at a time
    from `tensors` (the same names in the same order); returns the bytes of tensor data.

    Hand-written because safetensors' own writer (save_file) takes every tensor of a file at once. The format
    is simple: a little-endian u64 header length, a JSON header (name -> dtype, shape, byte range; padded
    with spaces to 8 bytes, as safetensors pads it), then the tensors' bytes back to back. The header needs
    only names and shapes, known before any tensor is read, so memory stays at one tensor.
    """
    assert sys.byteorder == "little", "safetensors stores little-endian bytes"
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    size = torch.empty((), dtype=dtype).element_size()
    offset = 0
    for name, shape in layout:
        end = offset + shape.numel() * size
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for (name, shape), (got, t) in zip(layout, tensors, strict=True):
            assert got == name and t.shape == shape, (name, shape, got, t.shape)
            f.write(t.to(dtype).contiguous().view(torch.uint8).numpy().data)
        f.flush()
        os.fsync(f.fileno())
    return offset


def _stream_hf(
    path: Path, metadata: Metadata, names: list[str], shapes: dict[str, torch.Size], m: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors of our tensors `names`, loading one checkpoint entry at a time."""
    for name in names:
        state = {f"model.{name}": torch.empty(shapes[name])}
        with ckpt.single_process_quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(path, metadata), no_dist=True)
        yield from to_hf(name, state[f"model.{name}"], m)


def export(source: Path, out: Path, dtype: str = "float32") -> Path:
    """Writes the checkpoint `source` (a step_N dir or a run dir) to `out` as Mixtral safetensors.

    One file per block (plus one for embeddings and one for the head), streamed: one checkpoint entry is
    loaded, converted and written at a time, so memory stays at one tensor (see `write_safetensors`).
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
        layout = [(k, v.shape) for n in names for k, v in to_hf(n, torch.empty(shapes[n], device="meta"), m)]
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        stream = _stream_hf(path, meta[ckpt.DCP_METADATA], names, shapes, m)
        total += write_safetensors(tmp / file, layout, getattr(torch, dtype), stream)
        weight_map.update(dict.fromkeys((k for k, _ in layout), file))
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
    """Reads boxes of tensors by name from model.safetensors or an indexed set of shards (files opened once,
    memory-mapped: only the bytes of a requested box are read)."""

    def __init__(self, hf_dir: Path) -> None:
        self.dir = hf_dir
        if (hf_dir / INDEX).is_file():
            self.files = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        else:
            with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")
        self.opened = ExitStack()
        self.handles: dict[str, object] = {}

    def read(self, name: str, box: tuple[slice, ...], shape: torch.Size) -> torch.Tensor:
        """The `box` of HF tensor `name` as fp32, after checking its full shape is `shape`."""
        if name not in self.files:
            raise ValueError(f"train.init_from={self.dir} lacks tensor {name} (rule: complete Mixtral weights)")
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = self.opened.enter_context(safe_open(str(self.dir / file), framework="pt"))
        part = self.handles[file].get_slice(name)
        if tuple(part.get_shape()) != tuple(shape):
            raise ValueError(
                f"train.init_from={self.dir}: {name} has shape {tuple(part.get_shape())}, the model needs "
                f"{tuple(shape)} (rule: the weights must match the model shape)"
            )
        return part[box].float()

    def close(self) -> None:
        self.opened.close()


@torch.no_grad()
def load_hf_weights(pm, hf_dir: Path, model: ModelConfig) -> None:
    """Fills this rank's shards of every parameter from Mixtral safetensors (any layout), reading only the
    slices of the HF tensors that those shards hold."""
    reader = _SafetensorsDir(hf_dir)
    try:
        for name, t in ckpt.model_tensors(pm):
            if name.endswith("expert_bias"):
                t.zero_()
                continue
            full_shape, offset, local = shard_extent(name, t, pm.dims, pm.expert_mesh)
            if local.numel():
                local.copy_(read_hf_part(name, full_shape, offset, local.shape, reader.read, model))
    finally:
        reader.close()
