"""Hugging Face interop: export a checkpoint as the HF family the model belongs to, and train from HF weights.

The families (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and Kimi-K2, OLMoE, GLM-4.5-MoE, gpt-oss), their config.json
both ways, their tensor names and what each refuses are in `interop/hf_families.py`; this module moves the
tensors. Export picks the family from the config's structure (`family_of`) and refuses, naming the field,
what that family cannot represent. Import recognises the family from config.json's model_type. HF's MoE
blocks are dropless: a model trained with moe.capacity_factor exports, and its logits match ours whenever no
token is dropped.

Conventions that differ and how both directions bridge them:
- Our expert weights are stacked [E, D, F] (w1, w3) and [E, F, D] (w2) used as x @ w. On disk HF keeps either
  one [out, in] Linear weight per expert (`experts.{e}.gate_proj.weight`, Mixtral's `w1`; what
  transformers' save_pretrained writes, and what every transformers version loads) or, as transformers 5
  holds them in memory, fused 3-D tensors `mlp.experts.gate_up_proj` [E, 2F, D] (gate rows, then up rows) and
  `mlp.experts.down_proj` [E, D, F]. Import reads either; export writes per-expert weights.
- Multi-token prediction (DeepSeek-V3, model.mtp_layers): module k is HF's `model.layers.{n_layers + k - 1}`,
  its block under the usual names and enorm, hnorm, eh_proj, shared_head.norm beside it. That layer also
  stores embed_tokens and shared_head.head, copies of the shared embedding and head: export writes them,
  import checks each box it reads equals the main tensor's (ValueError otherwise). transformers' model has no
  MTP module (it ignores, and save_pretrained drops, these layers); import builds the modules only when the
  weights carry them (`read_hf_config`).
- Our RoPE rotates interleaved channel pairs (2i, 2i+1); HF's rotate_half rotates (i, i + R/2), with the same
  frequencies. Permuting the rows of each head of q and k (and of their biases and norm weights) maps one onto
  the other: attention scores do not change when q and k channels share a permutation. DeepSeek-V3's
  `rope_interleave=True` is our layout already (only its rotary rows move when it is false).

Neither direction holds more than one tensor: export streams one checkpoint entry at a time into its
safetensors file, and import reads, per rank, only the slices of the HF tensors that its shards hold
(block-quantised FP8 weights dequantised box by box: `interop/fp8.py`; gpt-oss's MXFP4 experts: `interop/mxfp4.py`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.metadata import Metadata

from moeyard.interop import fp8, mxfp4
from moeyard.interop.hf_families import FAMILIES, MTP_COPIES, Family, Spec, family_of
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.model import Transformer
from moeyard.moe.mtp import mtp_block_ids
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.safe_metadata import SafeFileSystemReader
from moeyard.parallel.shards import shard_extent

INDEX = "model.safetensors.index.json"
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_EXPERT_WEIGHTS = ("w1", "w3", "w2")


class SafetensorsReader:
    """Reads boxes of tensors by name from model.safetensors or an indexed set of shards (files opened once,
    memory-mapped: only the bytes of a requested box are read)."""

    def __init__(self, hf_dir: Path, fp8_block: tuple[int, int] | None = None) -> None:
        """`fp8_block`: the block shape of block-quantised FP8 weights (`fp8.block_shape`), which `read`
        dequantises; None: no weight is quantised."""
        self.dir = hf_dir
        self.fp8_block = fp8_block
        if (hf_dir / INDEX).is_file():
            self.files = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        else:
            with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), "model.safetensors")
        self.opened = ExitStack()
        self.handles: dict[str, object] = {}

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, box: tuple[slice, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The `box` of HF tensor `name` as fp32, after checking its full shape is `shape`; a float8 weight
        with a scale is dequantised, reading only the scale blocks the box overlaps."""
        if not self.has(name) and self.has(name + mxfp4.BLOCKS) and len(shape) == 3:
            E, cols, rows = shape  # [E, in, out] in memory; [E, out, in/32, 16] and [E, out, in/32] on disk
            groups = -(-cols // mxfp4.GROUP)
            blocks = self._slice(name + mxfp4.BLOCKS, (E, rows, groups, mxfp4.GROUP // 2))
            return mxfp4.read_box(blocks, self._slice(name + mxfp4.SCALES, (E, rows, groups)), box)
        part = self._slice(name, shape)
        if part.get_dtype().startswith("F8"):
            if self.fp8_block is None or len(shape) != 2:
                raise ValueError(
                    f"train.init_from={self.dir}: {name} is {part.get_dtype()} with shape {tuple(shape)} (rule: "
                    "float8 weights are 2-D, under a config.json quantization_config giving weight_block_size)"
                )
            block = self.fp8_block
            scale = self._slice(name + fp8.SCALE_SUFFIX, fp8.scale_shape(tuple(shape), block))
            return fp8.dequantize(part[box], scale[fp8.scale_box(box, block)], box, block)
        return part[box].float()

    def _slice(self, name: str, shape: tuple[int, ...]):
        """The lazily read tensor `name` (safetensors' slice object), after checking its shape is `shape`."""
        if name not in self.files:
            raise ValueError(f"train.init_from={self.dir} lacks tensor {name} (rule: complete weights)")
        file = self.files[name]
        if file not in self.handles:
            self.handles[file] = self.opened.enter_context(safe_open(str(self.dir / file), framework="pt"))
        part = self.handles[file].get_slice(name)
        if tuple(part.get_shape()) != tuple(shape):
            raise ValueError(
                f"train.init_from={self.dir}: {name} has shape {tuple(part.get_shape())}, the model needs "
                f"{tuple(shape)} (rule: the weights must match the model shape)"
            )
        return part

    def close(self) -> None:
        self.opened.close()


class TensorMap:
    """Our tensors (layout-free names) <-> one family's HF tensors, for one model shape."""

    def __init__(self, family: Family, m: ModelConfig, hf: dict | None = None) -> None:
        """`hf`: the HF config.json, for the RoPE layout it names (default: the one our export writes)."""
        self.family = family
        self.specs: dict[str, Spec] = family.specs(m, hf or {})
        self.mtp_prefixes = [f"model.layers.{lid}." for lid in mtp_block_ids(m)]
        """The HF layers of the MTP modules, each storing copies of the embedding and head (`MTP_COPIES`)."""
        self.held: dict[str, torch.Tensor] = {}
        """A fused family's gate half of an expert tensor, until its up half comes (`Family.experts_to_hf`)."""

    def maps(self, name: str) -> bool:
        return name in _TOP or name.split(".", 2)[2] in self.specs or ".moe.experts." in name

    def _split(self, name: str) -> tuple[str, str]:
        """(HF prefix of the block, our name within the block)."""
        _, lid, rest = name.split(".", 2)
        return f"model.layers.{lid}.", rest

    def _expert_name(self, prefix: str, w: str, e: int) -> str:
        proj = self.family.expert_projs[_EXPERT_WEIGHTS.index(w)]
        return f"{prefix}{self.family.moe_prefix}.experts.{e}.{proj}.weight"

    # --- export: our full tensor -> HF tensors (per-expert layout) ---

    def to_hf(self, name: str, t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        """HF tensors for our full tensor `name`, one at a time (an expert stack gives one per expert, as views)."""
        if name in _TOP:
            yield _TOP[name], t
            for prefix in self.mtp_prefixes if name in MTP_COPIES else ():
                yield prefix + MTP_COPIES[name], t
            return
        prefix, rest = self._split(name)
        if rest.startswith("moe.experts.") and self.family.experts_to_hf is not None:
            yield from self.family.experts_to_hf(prefix, rest.rsplit(".", 1)[-1], t, self.held)
            return
        if rest.startswith("moe.experts.w"):
            w = rest.rsplit(".", 1)[-1]
            for e in range(t.shape[0]):
                yield self._expert_name(prefix, w, e), t[e].T
            return
        spec = self.specs[rest]
        if spec.block:  # HF row j is our row argsort(perm)[j] within each block
            inverse = torch.tensor(spec.perm).argsort().to(t.device)
            t = t.unflatten(0, (-1, spec.block))[:, inverse].flatten(0, 1)
        yield prefix + spec.hf, t

    # --- import: a box of our tensor <- slices of HF tensors (either expert layout) ---

    def read(
        self, name: str, full_shape: torch.Size, offset: tuple[int, ...], shape: torch.Size, reader: SafetensorsReader
    ) -> torch.Tensor:
        """The box [offset, offset + shape) of our tensor `name` (full shape `full_shape`), reading only the
        slices of the HF tensors it needs: the box's experts (each at the transposed box), and for permuted
        rows the whole heads the box's rows fall in (then permuted and cut to the box)."""
        box = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
        if name in _TOP:
            return self._read_shared(name, box, full_shape, reader)
        prefix, rest = self._split(name)
        if rest.startswith("moe.experts.") and self.family.read_experts is not None:
            return self.family.read_experts(prefix, rest.rsplit(".", 1)[-1], full_shape, box, reader)
        if rest.startswith("moe.experts.w"):
            return self._read_experts(prefix, rest.rsplit(".", 1)[-1], full_shape, box, reader)
        spec = self.specs[rest]
        hf_name = prefix + (spec.hf if spec.alt is None or reader.has(prefix + spec.hf) else spec.alt)
        if not spec.block:
            return reader.read(hf_name, box, full_shape)
        b = spec.block
        first, last = box[0].start // b, -(-box[0].stop // b)  # the blocks (heads) the rows fall in
        rows = reader.read(hf_name, (slice(first * b, last * b), *box[1:]), full_shape)
        rows = rows.unflatten(0, (-1, b))[:, torch.tensor(spec.perm)].flatten(0, 1)
        start = box[0].start - first * b
        return rows[start : start + shape[0]]

    def _read_shared(
        self, name: str, box: tuple[slice, ...], full_shape: torch.Size, reader: SafetensorsReader
    ) -> torch.Tensor:
        """A box of a top-level tensor; the embedding's and head's, checked against the MTP layers' copies."""
        t = reader.read(_TOP[name], box, full_shape)
        for prefix in self.mtp_prefixes if name in MTP_COPIES else ():
            copy = prefix + MTP_COPIES[name]
            if reader.has(copy) and not torch.equal(reader.read(copy, box, full_shape), t):
                raise ValueError(
                    f"train.init_from={reader.dir}: {copy} differs from {_TOP[name]} (rule: the MTP modules "
                    "share the embedding and output head, so their copies must be equal)"
                )
        return t

    def _read_experts(
        self, prefix: str, w: str, full_shape: torch.Size, box: tuple[slice, ...], reader: SafetensorsReader
    ) -> torch.Tensor:
        E, rows, cols = full_shape  # w1/w3: [E, D, F]; w2: [E, F, D]
        experts = range(box[0].start, box[0].stop)
        if reader.has(self._expert_name(prefix, w, box[0].start)):
            parts = [reader.read(self._expert_name(prefix, w, e), (box[2], box[1]), (cols, rows)) for e in experts]
            return torch.stack([part.T for part in parts])
        if w == "w2":  # down_proj [E, D, F]
            return reader.read(f"{prefix}mlp.experts.down_proj", (box[0], box[2], box[1]), (E, cols, rows)).mT
        fused = f"{prefix}mlp.experts.gate_up_proj"  # [E, 2F, D]: gate (w1) rows, then up (w3) rows
        if not reader.has(fused):
            raise ValueError(
                f"train.init_from={reader.dir} lacks tensor {self._expert_name(prefix, w, box[0].start)} "
                f"(or the fused {fused}) (rule: complete weights)"
            )
        up = cols if w == "w3" else 0
        return reader.read(fused, (box[0], slice(box[2].start + up, box[2].stop + up), box[1]), (E, 2 * cols, rows)).mT


def to_hf(
    name: str, t: torch.Tensor, m: ModelConfig, family: Family | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors for our full tensor `name` in `family`'s layout (default Mixtral)."""
    yield from TensorMap(family or FAMILIES["mixtral"], m).to_hf(name, t)


# --- export ---------------------------------------------------------------------------------------------------


def check_exportable(m: ModelConfig, e: MoEConfig) -> Family:
    """The family our config belongs to; ValueError naming the first field that family cannot represent."""
    family = family_of(m, e)
    for ok, field, value, rule in family.rules(m, e):
        if not ok:
            raise ValueError(f"{field}={value} has no Hugging Face {family.title} equivalent (rule: {rule} to export)")
    if m.mtp_layers and not family.mtp:
        raise ValueError(
            f"model.mtp_layers={m.mtp_layers} has no Hugging Face {family.title} equivalent "
            "(rule: must be 0 to export; DeepSeek-V3 stores MTP modules)"
        )
    return family


def hf_config(m: ModelConfig, e: MoEConfig, dtype: str) -> dict:
    """config.json of the family our (exportable) config belongs to."""
    return {**check_exportable(m, e).config(m, e), "torch_dtype": dtype, "dtype": dtype}


def _full_shapes(m: ModelConfig, e: MoEConfig, tmap: TensorMap) -> dict[str, torch.Size]:
    """Our tensors that the family stores, with their full shapes (the aux-free bias where it has one)."""
    with torch.device("meta"):
        model = Transformer(m, e)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for lid, moe in model.moe_layers().items():
        name = f"layers.{lid}.moe.router.expert_bias"
        if tmap.maps(name):
            shapes[name] = moe.router.expert_bias.shape
    return shapes


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
    path: Path, metadata: Metadata, names: list[str], shapes: dict[str, torch.Size], tmap: TensorMap
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors of our tensors `names`, loading one checkpoint entry at a time."""
    for name in names:
        state = {f"model.{name}": torch.empty(shapes[name])}
        with ckpt.single_process_quiet():
            dcp.load(state, storage_reader=SafeFileSystemReader(path, metadata), no_dist=True)
        yield from tmap.to_hf(name, state[f"model.{name}"])


def export(source: Path, out: Path, dtype: str = "float32") -> Path:
    """Writes the checkpoint `source` (a step_N dir or a run dir) to `out` as safetensors of its HF family.

    One file per block (plus one for embeddings and one for the head), streamed: one checkpoint entry is
    loaded, converted and written at a time, so memory stays at one tensor (see `write_safetensors`).
    Written into OUT.tmp and renamed, so an interrupted export leaves no half-written OUT.
    """
    path, meta = ckpt.resolve(str(source), source, "export")
    m, e = ModelConfig(**meta["model"]), MoEConfig(**meta["moe"])
    config = hf_config(m, e, dtype)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out={out} exists and is not empty (rule: export into a new or empty directory)")
    tmap = TensorMap(family_of(m, e), m, config)
    shapes = _full_shapes(m, e, tmap)
    groups = [[n for n in shapes if n == "tok_embeddings.weight"]]
    groups += [[n for n in shapes if n.startswith(f"layers.{i}.")] for i in range(m.n_layers)]
    mtp = [(f"layers.{lid}.", f"mtp.{lid}.") for lid in mtp_block_ids(m)]  # a module's block and the rest
    groups += [[n for n in shapes if n.startswith(prefixes)] for prefixes in mtp]
    groups += [[n for n in shapes if n in ("norm.weight", "output.weight")]]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        layout = [(k, v.shape) for n in names for k, v in tmap.to_hf(n, torch.empty(shapes[n], device="meta"))]
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        stream = _stream_hf(path, meta[ckpt.DCP_METADATA], names, shapes, tmap)
        total += write_safetensors(tmp / file, layout, getattr(torch, dtype), stream)
        weight_map.update(dict.fromkeys((k for k, _ in layout), file))
    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return path


# --- import ---------------------------------------------------------------------------------------------------


def read_hf_config(hf_dir: Path, field: str) -> dict:
    """config.json of a family moeyard imports, after checking every key maps (ValueError naming the key)."""
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{field}={hf_dir}: config.json is missing or corrupt ({type(err).__name__}) "
            "(rule: a Hugging Face model directory has a config.json)"
        ) from None
    family = FAMILIES.get(hf.get("model_type"))
    if family is None:
        raise ValueError(
            f"{field}={hf_dir}: model_type={hf.get('model_type')} (rule: moeyard imports "
            f"model_type {', '.join(FAMILIES)})"
        )
    hf = family.normalise(hf)
    if family.mtp and hf.get("num_nextn_predict_layers"):
        hf["num_nextn_predict_layers"] = _mtp_layers_stored(hf_dir, hf)
    missing = [key for key in family.required if key not in hf]
    if missing:
        raise ValueError(f"{field}={hf_dir}: config.json lacks {', '.join(missing)} (rule: a {family.title} config)")
    try:
        family.overrides(hf)
    except ValueError as err:
        raise ValueError(f"{field}={hf_dir}: {err}") from None
    return hf


def _mtp_layers_stored(hf_dir: Path, hf: dict) -> int:
    """How many of config.json's num_nextn_predict_layers MTP layers the weights hold: all, or none where a
    checkpoint lacks them (transformers' save_pretrained drops them, leaving the config's count)."""
    first = f"model.layers.{hf['num_hidden_layers']}.eh_proj.weight"
    if (hf_dir / INDEX).is_file():
        try:
            names = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            return 0  # a corrupt index: `check_hf_dir` names it
    elif (hf_dir / "model.safetensors").is_file():
        try:
            with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
                names = set(f.keys())
        except (SafetensorError, OSError):
            return 0  # a corrupt file: `check_hf_dir` names it
    else:
        return 0
    return hf["num_nextn_predict_layers"] if first in names else 0


def overrides_from_hf(hf: dict) -> dict[str, object]:
    """The model/moe config of the HF model `hf` (a config.json `read_hf_config` accepted), as Hydra keys."""
    return FAMILIES[hf["model_type"]].overrides(hf)


def hydra_overrides(hf: dict) -> list[str]:
    """`overrides_from_hf` as Hydra override strings (booleans lower case, None as null)."""
    text = {True: "true", False: "false", None: "null"}
    return [f"{k}={text[v] if v is None or isinstance(v, bool) else v}" for k, v in overrides_from_hf(hf).items()]


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
    for file in _weight_files(hf_dir, field):
        _check_safetensors(hf_dir / file, field)


def _weight_files(hf_dir: Path, field: str) -> list[str]:
    """The safetensors files of `hf_dir`: those its index maps tensors to, or model.safetensors."""
    if not (hf_dir / INDEX).is_file():
        return ["model.safetensors"]
    try:
        weight_map = json.loads((hf_dir / INDEX).read_text())["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{field}={hf_dir}: {INDEX} is corrupt ({type(err).__name__}) (rule: a JSON index with a weight_map)"
        ) from None


def _check_safetensors(path: Path, field: str) -> None:
    """The file's header parses and its tensors cover the file exactly, so a truncated or overwritten file is
    found here, once, and not by every rank as it reads its slices (same-size damage to the tensor bytes is
    not: the format carries no checksum)."""
    if not path.is_file():
        raise ValueError(f"{field}={path.parent}: {path.name} is missing (rule: every file the index names)")
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except (SafetensorError, OSError) as err:
        detail = str(err).removeprefix("Error while deserializing header: ")
        raise ValueError(
            f"{field}={path.parent}: {path.name} is truncated or corrupt ({detail}) "
            "(rule: complete safetensors files; copy or download them again)"
        ) from None


@torch.no_grad()
def load_hf_weights(pm, hf_dir: Path, model: ModelConfig) -> None:
    """Fills this rank's shards of every parameter (and aux-free bias) from the HF safetensors (either expert
    layout), reading only the slices of the HF tensors that those shards hold."""
    hf = json.loads((hf_dir / "config.json").read_text())
    tmap = TensorMap(FAMILIES[hf["model_type"]], model, hf)
    reader = SafetensorsReader(hf_dir, fp8.block_shape(hf))
    try:
        for name, t in ckpt.model_tensors(pm):
            if not tmap.maps(name):  # the aux-free bias of a family without one
                t.zero_()
                continue
            full_shape, offset, local = shard_extent(name, t, pm.dims, pm.expert_mesh)
            if local.numel():
                local.copy_(tmap.read(name, full_shape, offset, local.shape, reader))
    finally:
        reader.close()
