"""Metric sinks: metrics.jsonl (always, rank 0) and a console line per logged step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl and echoes it on rank 0."""

    def __init__(self, run_dir: Path, is_writer: bool, progress: bool = False, total_steps: int = 0) -> None:
        self.is_writer = is_writer
        self.total_steps = total_steps
        self.file = None
        if is_writer:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = (run_dir / "metrics.jsonl").open("a", buffering=1)

    def write(self, metrics: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(metrics) + "\n")
        shown = " ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if k in ("step", "loss", "aux_loss", "z_loss", "eval_loss", "lr", "tokens_per_s")
        )
        print(f"[{metrics.get('step')}/{self.total_steps}] {shown}", flush=True)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
