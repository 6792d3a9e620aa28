"""Metric sinks on rank 0: metrics.jsonl (always), a console line or rich progress bar, optional TensorBoard."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
SHOWN = ("loss", "aux_loss", "z_loss", "eval_loss", "lr", "tokens_per_s", "mfu")

# A viridis-like ramp (dark blue -> green -> yellow) for load heatmap images; no matplotlib needed.
RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def heatmap_image(load_LE: np.ndarray, cell: int = 12) -> np.ndarray:
    """uint8 HWC image of a [layers, experts] load matrix, each row scaled to its own maximum."""
    peak = np.maximum(load_LE.max(axis=1, keepdims=True), 1e-12)
    pos = np.clip(load_LE / peak, 0, 1) * (len(RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(RAMP) - 2)
    frac = (pos - lo)[..., None]
    rgb = RAMP[lo] * (1 - frac) + RAMP[lo + 1] * frac
    return rgb.repeat(cell, axis=0).repeat(cell, axis=1).astype(np.uint8)


class TensorBoardSink:
    """Scalars of every metrics line and expert-load heatmaps, into RUN_DIR/tensorboard."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency: only when asked for

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step" and isinstance(value, int | float):
                self.writer.add_scalar(f"train/{key}", value, step)

    def expert_load(self, rec: dict[str, Any]) -> None:
        step, layers = rec["step"], rec["layers"]
        routed = np.array([layer["routed"] for layer in layers.values()], dtype=np.float64)
        self.writer.add_image("expert_load/routed", heatmap_image(routed), step, dataformats="HWC")
        for lid, layer in layers.items():
            for key in ("imbalance", "cv", "drop_rate", "entropy"):
                self.writer.add_scalar(f"expert_load/{key}/layer{lid}", layer[key], step)

    def close(self) -> None:
        self.writer.close()


def cut_metrics(run_dir: Path, step: int) -> int:
    """Drops the lines of RUN_DIR/metrics.jsonl logged after `step`, and any line a crash cut short; returns
    how many. A run resumed from step N logs the steps after N again: so each step is in the file once.

    Atomic: the kept lines go to a new file that then replaces the old one (a crash leaves one or the other),
    and a reader tailing the file sees a new file (another inode) and reads it from the start.
    """
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return 0
    tmp, cut = path.with_name(f"{METRICS_FILE}.tmp"), 0
    with path.open("rb") as old, tmp.open("wb") as new:
        for line in old:
            if line.endswith(b"\n") and _logged_step(line) <= step:
                new.write(line)
            else:
                cut += 1
        new.flush()
        os.fsync(new.fileno())
    if cut:
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return cut


def _logged_step(line: bytes) -> float:
    """The step of a metrics line; infinity for a line that does not parse (cut short by a crash)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")


class MetricsLog:
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl and shows it on rank 0."""

    def __init__(
        self, run_dir: Path, is_writer: bool, progress: bool = False, total_steps: int = 0, tensorboard: bool = False
    ) -> None:
        self.is_writer = is_writer
        self.total_steps = total_steps
        self.file = None
        self.bar = None
        self.tb: TensorBoardSink | None = None
        if not is_writer:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / METRICS_FILE).open("a", buffering=1)
        if tensorboard:
            self.tb = TensorBoardSink(run_dir)
        if progress and sys.stdout.isatty():
            self.bar = ProgressBar(total_steps)

    def write(self, metrics: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            self.tb.scalars(metrics)
        shown = " ".join(
            f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
            for k in SHOWN
            if k in metrics
        )
        line = f"[{metrics.get('step')}/{self.total_steps}] {shown}"
        if self.bar is not None:
            self.bar.update(metrics, line)
        else:
            print(line, flush=True)

    def write_expert_load(self, rec: dict[str, Any]) -> None:
        """Expert-load heatmap and per-layer scalars to TensorBoard (the JSONL line is the tracker's)."""
        if self.tb is not None:
            self.tb.expert_load(rec)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class ProgressBar:
    """rich progress bar: step, loss, tokens/s, MFU and ETA; metric lines print above it."""

    def __init__(self, total_steps: int, console=None) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = self.progress.add_task("train", total=total_steps, info="")
        self.progress.start()

    def update(self, metrics: dict[str, Any], line: str) -> None:
        info = f"loss {metrics.get('loss', float('nan')):.4f}  {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        if "mfu" in metrics:
            info += f"  MFU {100 * metrics['mfu']:.2f}%"
        self.progress.console.print(line, highlight=False)
        self.progress.update(self.task, completed=int(metrics["step"]), info=info)

    def close(self) -> None:
        self.progress.stop()
