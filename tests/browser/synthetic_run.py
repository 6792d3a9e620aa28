"""A synthetic run directory at DeepSeek-V3 scale for the dashboard (not a test module): no training.

`write_steps` appends logged steps the way rank 0 does (expert_load.jsonl index lines and expert_load.bin
blobs through `LoadWriter`, metrics.jsonl lines, a config.yaml), with numpy in a few seconds. The per-expert
arrays cycle through a small pool of encoded blobs: encoding is the writer's cost, not the dashboard's, and
the dashboard only ever reads the blob of the step it shows. The pool's loads are small and quantized, so
a blob is ~32 KB instead of a real 61 x 256 run's ~160 KB, and 5,000 steps take ~190 MB on disk.
By hand: `python -m tests.browser.synthetic_run RUN_DIR [STEPS]`, then `moeyard dashboard RUN_DIR`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeyard.profiling.expert_load import LoadWriter
from moeyard.profiling.load_format import encode_blob

LAYERS, EXPERTS, EP = 61, 256, 64  # DeepSeek-V3 has 58 MoE blocks of its 61; 61 is the worst case
BREAKDOWN_EVERY = 10


@dataclass
class Pool:
    """Encoded per-expert arrays; logged step s uses entry s % len."""

    arrays: list[dict[str, np.ndarray]]
    blobs: list[tuple[bytes, list]]

    def routed(self, step: int) -> np.ndarray:
        return self.arrays[step % len(self.arrays)]["routed"]


def make_pool(size: int = 8, seed: int = 0) -> Pool:
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(size):
        routed = rng.gamma(20, 1, (LAYERS, EXPERTS)).round().astype(np.int32)  # ~20 tokens, 22% spread
        share = routed / routed.sum(axis=1, keepdims=True)
        arrays.append(
            {
                "routed": routed,
                "dropped": np.zeros_like(routed),
                "mean_prob": (np.round(share * 1024) / 1024).astype(np.float32),
                "received": routed.reshape(LAYERS, EP, -1).sum(-1).astype(np.int32),
                "bias": (np.round(rng.normal(0, 0.05, routed.shape) * 16) / 16).astype(np.float32),
            }
        )
    return Pool(arrays, [encode_blob(a) for a in arrays])


def write_steps(run_dir: Path, first: int, last: int, pool: Pool, total_steps: int = 10_000, seed: int = 0) -> None:
    """Appends logged steps first..last (inclusive) to run_dir's metrics and expert-load files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.yaml"
    if not config.exists():
        config.write_text(f"moe:\n  num_experts: {EXPERTS}\ntrain:\n  steps: {total_steps}\n")
    rng = np.random.default_rng(seed + first)
    imbalance = 1 + rng.gamma(2, 0.2, (last - first + 1, LAYERS))
    writer = LoadWriter(run_dir, compact=True)
    with (run_dir / "metrics.jsonl").open("a") as metrics:
        for i, step in enumerate(range(first, last + 1)):
            layers = {
                str(layer): {
                    "imbalance": float(imbalance[i, layer]),
                    "cv": 0.2,
                    "dead": [],
                    "drop_rate": 0.0,
                    "entropy": 3.1,
                }
                for layer in range(LAYERS)
            }
            line = {"step": step, "num_experts": EXPERTS, "ep": EP, "layers": layers, "warnings": []}
            writer.append(line, *pool.blobs[step % len(pool.blobs)])
            metrics.write(json.dumps(metrics_row(step, rng)) + "\n")
    writer.close()


def metrics_row(step: int, rng: np.random.Generator) -> dict[str, float]:
    row = {
        "step": step,
        "loss": float(8 * np.exp(-step / 2000) + 2 + 0.05 * rng.standard_normal()),
        "aux_loss": 0.01,
        "z_loss": 1e-4,
        "tokens_per_s": float(1.2e6 + 1e4 * rng.standard_normal()),
        "mfu": 0.41,
    }
    if step % BREAKDOWN_EVERY == 0:
        row |= {
            "time_forward_ms": 400.0,
            "time_backward_ms": 800.0,
            "time_step_ms": 1250.0,
            "comm_all_to_all_ms": 300.0,
        }
    return row


if __name__ == "__main__":
    write_steps(Path(sys.argv[1]), 1, int(sys.argv[2]) if len(sys.argv) > 2 else 5000, make_pool())
