"""Expert-load tracker: per logged step, per MoE layer and expert, what the routers decided, over all ranks.

Shape legend: L MoE layers of the whole model, E experts, P expert-parallel ranks.

The MoE layers already keep detached per-forward statistics; the trainer drains them every step and hands
them here. Only logged steps pay: one pack of a few small tensors per layer, one all-reduce of an [L, 4E+P+2]
float64 matrix over the world group, and one copy to the host. The world group (not the data-parallel one)
because pipeline stages hold different layers and rank 0 writes them all; every rank contributes the tokens
it routed (tensor-parallel ranks route different slices of the sequences).

On-disk format (rank 0 appends one record per logged step; a resumed run appends to the same files, and
readers key records by step, the later one winning):

RUN_DIR/expert_load.jsonl holds one JSON object per line:
    {"step": int, "num_experts": E, "ep": P, "warnings": [str], "layers": {layer id: layer}}
where each layer has the derived "imbalance" (max/mean tokens), "cv" (std/mean), "dead" (expert ids with no
tokens), "drop_rate" and "entropy" (mean router entropy), and, in the inline form, the arrays: "routed" and
"dropped" (E ints), "mean_prob" (E floats, 6 decimals), "bias" (E floats; only with aux-free balancing) and
"received" (P ints: tokens each EP rank's experts received).

Inline up to INLINE_MAX_CELLS layer x expert cells: a JSON array element costs ~35 bytes a cell, so at
61 layers x 256 experts (EP 64) a line is 550 KB, 5.5 GB per 10k logged steps, and a reader has to parse all
of it to plot one number per layer. Above the threshold the line becomes an index: the same object without
the arrays, plus
    "arrays": {"offset": int, "nbytes": int, "codec": "shuffle-zlib", "fields": [[name, dtype, shape], ...]}
pointing at a blob in RUN_DIR/expert_load.bin, an append-only file of blobs. A blob is
zlib(concat over fields of the array's bytes, byte-shuffled: byte 0 of every element, then byte 1, ...);
fields are "routed", "dropped" [L, E], "received" [L, P] as "<i4" ("<i8" if a count passes 2**31 - 1) and
"mean_prob", "bias" [L, E] as "<f4", rows in the order of the line's "layers".
`profiling.load_format.read_blob(run_dir, line["arrays"])` decodes one. The blob is written and flushed
before its line, so a reader never meets a line whose blob is missing (a crash between the two leaves an
unreferenced blob).

Measured at 61 x 256, EP 64, with random loads of a real run's spread (counts ~2M +- 22%): 157 KB of blob and
7 KB of index line a step: 1.64 GB per 10k logged steps, 3.4x less than inline. Exact int32 counts carry ~2.7
bytes of entropy a cell and float32 means barely compress; the last 1.6x (float16 means and bias: 1.04 GB)
would cost the bias its step-to-step resolution.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.profiling.load_format import BLOB_FILE, CODEC, encode_blob

Stats = dict[str, list[dict[str, torch.Tensor]]]

INLINE_MAX_CELLS = 2048
"""Layer x expert cells up to which the arrays stay inline: <= ~72 KB a line, <= ~0.7 GB per 10k logged steps
(Mixtral's 32 x 8 and DeepSeek-V2-Lite's 26 x 64 stay human-readable; DeepSeek-V3's 58 x 256 goes compact)."""
ARRAY_KEYS = ("routed", "dropped", "mean_prob", "bias", "received")


def moe_layer_ids(model: ModelConfig) -> list[str]:
    """Ids of the model's MoE blocks, in order."""
    return [str(i) for i in range(model.n_layers) if model.is_moe_layer(i)]


def derive(routed_E: list[float], kept_E: list[float]) -> dict[str, Any]:
    """Imbalance (max/mean), coefficient of variation (std/mean), dead experts and drop rate of one layer."""
    load = np.asarray(routed_E, dtype=np.float64)  # numpy, not torch: a 256-expert layer in half the time
    total = float(load.sum())
    mean = total / len(routed_E)
    return {
        "imbalance": float(load.max()) / mean if mean > 0 else 0.0,
        "cv": float(load.std()) / mean if mean > 0 else 0.0,  # population std, as the docs define cv
        "dead": np.flatnonzero(load == 0).tolist(),
        "drop_rate": (total - sum(kept_E)) / total if total > 0 else 0.0,
    }


def _narrow_counts(a: np.ndarray) -> np.ndarray:
    """int32 unless a count does not fit (tokens per step past 2**31 - 1): the blob records the dtype."""
    return a.astype(np.int32) if a.size == 0 or a.max() <= np.iinfo(np.int32).max else a


class LoadWriter:
    """Appends a logged step's record to expert_load.jsonl, inline or compact (see the module docstring)."""

    def __init__(self, run_dir: Path, compact: bool) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.lines = (run_dir / "expert_load.jsonl").open("a", buffering=1)  # line-buffered: the dashboard tails it
        self.blobs = (run_dir / BLOB_FILE).open("ab") if compact else None

    def write(self, rec: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """`rec` as `ExpertLoadTracker.describe` makes it; `arrays` its per-expert arrays as numpy [L, ...]."""
        if self.blobs is None:
            self.lines.write(json.dumps(rec) + "\n")
            return
        packed = {k: _narrow_counts(v) if v.dtype.kind == "i" else v.astype(np.float32) for k, v in arrays.items()}
        self.append(index_line(rec), *encode_blob(packed))

    def append(self, line: dict[str, Any], blob: bytes, fields: list[list[Any]]) -> None:
        """Blob first (flushed), then the line that points at it."""
        assert self.blobs is not None, "append is the compact form's"
        offset = self.blobs.seek(0, os.SEEK_END)
        self.blobs.write(blob)
        self.blobs.flush()
        ref = {"offset": offset, "nbytes": len(blob), "codec": CODEC, "fields": fields}
        self.lines.write(json.dumps({**line, "arrays": ref}) + "\n")

    def close(self) -> None:
        self.lines.close()
        if self.blobs is not None:
            self.blobs.close()


def index_line(rec: dict[str, Any]) -> dict[str, Any]:
    """The record without its per-expert arrays: what a compact line keeps."""
    layers = {lid: {k: v for k, v in layer.items() if k not in ARRAY_KEYS} for lid, layer in rec["layers"].items()}
    return {**rec, "layers": layers}


class ExpertLoadTracker:
    """Reduces the routing statistics of a logged step and writes its record (inline or compact: see above)."""

    KEYS = ("routed", "kept", "mean_prob", "received", "entropy")

    def __init__(
        self,
        model: ModelConfig,
        moe: MoEConfig,
        device: torch.device,
        ep: int,
        ep_rank: int,
        run_dir: Path | None,
        dead_steps: int,
        imbalance_warn: float,
        compact: bool | None = None,
    ) -> None:
        """`compact`: write the compact form (None: when the model has more than INLINE_MAX_CELLS cells)."""
        self.layer_ids = moe_layer_ids(model)
        self.E, self.P, self.ep_rank = moe.num_experts, ep, ep_rank
        self.device = device
        self.bias_used = moe.bias_update_rate > 0
        self.dead_steps, self.imbalance_warn = dead_steps, imbalance_warn
        self.dead_streak = np.zeros((len(self.layer_ids), self.E), dtype=np.int64)
        self.over_threshold: set[str] = set()
        if compact is None:
            compact = len(self.layer_ids) * self.E > INLINE_MAX_CELLS
        self.writer = LoadWriter(run_dir, compact) if run_dir is not None else None

    def pack(self, layer_stats: Stats, biases: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's rows [L, routed E | kept E | mean_prob E | bias E | received P | entropy | 1]."""
        E, P = self.E, self.P
        rows = torch.zeros(len(self.layer_ids), 4 * E + P + 2, dtype=torch.float64, device=self.device)
        for i, lid in enumerate(self.layer_ids):
            stats = layer_stats.get(lid)
            if not stats:
                continue
            stacked = {k: torch.stack([s[k] for s in stats]).double() for k in self.KEYS}
            row = rows[i]
            row[:E] = stacked["routed"].sum(0)
            row[E : 2 * E] = stacked["kept"].sum(0)
            row[2 * E : 3 * E] = stacked["mean_prob"].mean(0)
            row[3 * E : 4 * E] = biases[lid].double()
            row[4 * E + self.ep_rank] = stacked["received"].sum()
            row[-2] = stacked["entropy"].mean()
            row[-1] = 1.0
        return rows

    def record(self, step: int, layer_stats: Stats, biases: dict[str, torch.Tensor]) -> dict[str, Any] | None:
        """Collective over the world group (every rank calls it); the writer gets and writes the record."""
        rows = self.pack(layer_stats, biases)
        if dist.is_initialized():
            dist.all_reduce(rows)
        return self.write_reduced(step, rows.cpu())

    def write_reduced(self, step: int, rows: torch.Tensor) -> dict[str, Any] | None:
        """Rows already summed over ranks (on the host; the trainer packs them into its logging step's one
        collective): the writer describes and writes them; returns the record (None on other ranks)."""
        if self.writer is None:
            return None
        arrays = self.arrays(rows)
        rec = self.describe(step, rows, arrays)
        self.writer.write(rec, arrays)
        return rec

    def arrays(self, rows: torch.Tensor) -> dict[str, np.ndarray]:
        """Per-expert arrays [L, E] ([L, P] for received) of reduced rows: counts int64, router means float64."""
        E, P, r = self.E, self.P, rows.numpy()
        n = np.maximum(1.0, r[:, -1:])  # ranks that contributed to each layer (the dp degree)
        routed = r[:, :E].round().astype(np.int64)
        out = {
            "routed": routed,
            "dropped": routed - r[:, E : 2 * E].round().astype(np.int64),
            "mean_prob": r[:, 2 * E : 3 * E] / n,
            "received": r[:, 4 * E : 4 * E + P].round().astype(np.int64),
        }
        if self.bias_used:
            out["bias"] = r[:, 3 * E : 4 * E] / n
        return out

    def describe(self, step: int, rows: torch.Tensor, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """The JSON record of reduced rows: raw counts per expert, the derived figures, and warnings."""
        layers: dict[str, Any] = {}
        for i, lid in enumerate(self.layer_ids):
            routed, dropped = arrays["routed"][i].tolist(), arrays["dropped"][i].tolist()
            layer = {
                "routed": routed,
                "dropped": dropped,
                "mean_prob": np.round(arrays["mean_prob"][i], 6).tolist(),
                "received": arrays["received"][i].tolist(),
                "entropy": float(rows[i, -2]) / max(1.0, float(rows[i, -1])),
                **derive(routed, [r - d for r, d in zip(routed, dropped, strict=True)]),
            }
            if self.bias_used:
                layer["bias"] = np.round(arrays["bias"][i], 6).tolist()
            layers[lid] = layer
        rec = {"step": step, "num_experts": self.E, "ep": self.P, "layers": layers}
        rec["warnings"] = self.warnings(layers)
        for w in rec["warnings"]:
            print(f"moeyard: warning: step {step}: {w}", file=sys.stderr, flush=True)
        return rec

    def warnings(self, layers: dict[str, Any]) -> list[str]:
        """Dead for `dead_steps` logged steps in a row (once per streak); imbalance crossing the threshold."""
        out = []
        for i, (lid, layer) in enumerate(layers.items()):
            dead = np.asarray(layer["routed"]) == 0
            self.dead_streak[i] = np.where(dead, self.dead_streak[i] + 1, 0)
            for e in np.flatnonzero(self.dead_streak[i] == self.dead_steps).tolist():
                out.append(f"layer {lid} expert {e} received no tokens for {self.dead_steps} logged steps")
            if layer["imbalance"] > self.imbalance_warn and lid not in self.over_threshold:
                out.append(
                    f"layer {lid} load imbalance (max/mean) {layer['imbalance']:.2f} > "
                    f"profiling.imbalance_warn={self.imbalance_warn}"
                )
                self.over_threshold.add(lid)
            elif layer["imbalance"] <= self.imbalance_warn:
                self.over_threshold.discard(lid)
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
