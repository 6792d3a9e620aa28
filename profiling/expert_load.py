"""Expert-load tracker: per logged step, per MoE layer and expert, what the routers decided, over all ranks.

Shape legend: L MoE layers of the whole model, E experts, P expert-parallel ranks.

The MoE layers already keep detached per-forward statistics; the trainer drains them every step and hands
them here. Only logged steps pay: one pack of a few small tensors per layer, one all-reduce of an [L, 4E+P+2]
float64 matrix over the world group, and one copy to the host. The world group (not the data-parallel one)
because pipeline stages hold different layers and rank 0 writes them all; every rank contributes the tokens
it routed (tensor-parallel ranks route different slices of the sequences).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe.config import ModelConfig, MoEConfig

Stats = dict[str, list[dict[str, torch.Tensor]]]


def moe_layer_ids(model: ModelConfig) -> list[str]:
    """Ids of the model's MoE blocks, in order."""
    return [str(i) for i in range(model.n_layers) if model.is_moe_layer(i)]


def derive(routed_E: list[float], kept_E: list[float]) -> dict[str, Any]:
    """Imbalance (max/mean), coefficient of variation (std/mean), dead experts and drop rate of one layer."""
    load = torch.tensor(routed_E, dtype=torch.float64)
    total = float(load.sum())
    mean = total / len(routed_E)
    return {
        "imbalance": float(load.max()) / mean if mean > 0 else 0.0,
        "cv": float(load.std(correction=0)) / mean if mean > 0 else 0.0,
        "dead": [e for e, n in enumerate(routed_E) if n == 0],
        "drop_rate": (total - sum(kept_E)) / total if total > 0 else 0.0,
    }


class ExpertLoadTracker:
    """Reduces the routing statistics of a logged step and writes one line to RUN_DIR/expert_load.jsonl."""

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
    ) -> None:
        self.layer_ids = moe_layer_ids(model)
        self.E, self.P, self.ep_rank = moe.num_experts, ep, ep_rank
        self.device = device
        self.bias_used = moe.bias_update_rate > 0
        self.dead_steps, self.imbalance_warn = dead_steps, imbalance_warn
        self.dead_streak = torch.zeros(len(self.layer_ids), self.E, dtype=torch.long)
        self.over_threshold: set[str] = set()
        self.file = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = (run_dir / "expert_load.jsonl").open("a", buffering=1)

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
        if self.file is None:
            return None
        rec = self.describe(step, rows.cpu())
        self.file.write(json.dumps(rec) + "\n")
        return rec

    def describe(self, step: int, rows: torch.Tensor) -> dict[str, Any]:
        """The JSON record of reduced rows: raw counts per expert, the derived figures, and warnings."""
        E = self.E
        layers: dict[str, Any] = {}
        for i, lid in enumerate(self.layer_ids):
            row, n = rows[i], max(1.0, float(rows[i, -1]))  # n: ranks that contributed (the dp degree)
            routed, kept = row[:E].tolist(), row[E : 2 * E].tolist()
            layer = {
                "routed": [int(v) for v in routed],
                "dropped": [int(r - k) for r, k in zip(routed, kept, strict=True)],
                "mean_prob": [round(v / n, 6) for v in row[2 * E : 3 * E].tolist()],
                "received": [int(v) for v in row[4 * E : 4 * E + self.P].tolist()],
                "entropy": float(row[-2]) / n,
                **derive(routed, kept),
            }
            if self.bias_used:
                layer["bias"] = [round(v / n, 6) for v in row[3 * E : 4 * E].tolist()]
            layers[lid] = layer
        rec = {"step": step, "num_experts": E, "ep": self.P, "layers": layers}
        rec["warnings"] = self.warnings(layers)
        for w in rec["warnings"]:
            print(f"moeyard: warning: step {step}: {w}", file=sys.stderr, flush=True)
        return rec

    def warnings(self, layers: dict[str, Any]) -> list[str]:
        """Dead for `dead_steps` logged steps in a row (once per streak); imbalance crossing the threshold."""
        out = []
        for i, (lid, layer) in enumerate(layers.items()):
            dead = torch.tensor(layer["routed"]) == 0
            self.dead_streak[i] = torch.where(dead, self.dead_streak[i] + 1, 0)
            for e in (self.dead_streak[i] == self.dead_steps).nonzero().flatten().tolist():
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
        if self.file is not None:
            self.file.close()
            self.file = None
