"""Metric sinks on rank 0: metrics.jsonl (always), a console line or rich progress bar, optional TensorBoard and
Weights & Biases."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moeyard.profiling.config import ProfilingConfig

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
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
        step = rec["step"]
        self.writer.add_image("expert_load/routed", heatmap_image(routed_matrix(rec)), step, dataformats="HWC")
        for tag, value in layer_scalars(rec).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


def routed_matrix(rec: dict[str, Any]) -> np.ndarray:
    """The [layers, experts] routed-token counts of an expert-load record."""
    return np.array([layer["routed"] for layer in rec["layers"].values()], dtype=np.float64)


def layer_scalars(rec: dict[str, Any]) -> dict[str, float]:
    """An expert-load record's per-layer figures, tagged expert_load/<figure>/layer<id>."""
    figures = ("imbalance", "cv", "drop_rate", "entropy")
    return {f"expert_load/{key}/layer{lid}": layer[key] for lid, layer in rec["layers"].items() for key in figures}


class WandbSink:
    """Scalars of every metrics line and expert-load heatmaps, to a Weights & Biases run (files in RUN_DIR/wandb).

    One run directory is one W&B run: its id is kept in RUN_DIR/wandb_run_id, so a resumed run continues it.
    """

    def __init__(self, run_dir: Path, p: ProfilingConfig, job_config: dict[str, Any]) -> None:
        import wandb  # optional dependency: only when asked for

        self.wandb = wandb
        self.run = wandb.init(
            project=p.wandb_project,
            name=p.wandb_name or run_dir.name,
            dir=str(run_dir),
            config=job_config,
            mode=None if p.wandb_mode == "auto" else p.wandb_mode,  # None: W&B reads WANDB_MODE
            id=wandb_run_id(run_dir),
            resume="allow",
        )
        # A resumed run trains the steps after its checkpoint again; the W&B run already holds them (the same
        # batches from the same weights) and refuses a step that goes back, with a warning per call: skip them.
        self.first_step = self.run.starting_step

    def scalars(self, metrics: dict[str, Any]) -> None:
        step = int(metrics["step"])
        if step >= self.first_step:
            scalars = {f"train/{k}": v for k, v in metrics.items() if k != "step" and isinstance(v, int | float)}
            self.run.log(scalars, step=step)

    def expert_load(self, rec: dict[str, Any]) -> None:
        step = int(rec["step"])
        if step >= self.first_step:
            image = self.wandb.Image(heatmap_image(routed_matrix(rec)), caption="layers x experts, rows scaled to max")
            self.run.log({"expert_load/routed": image, **layer_scalars(rec)}, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory: the one kept in RUN_DIR/wandb_run_id, or a new one written there."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids (its generator is not public API)
    tmp = path.with_name(f"{WANDB_ID_FILE}.tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)  # atomic: a crash leaves no half-written id
    return run_id


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
        self,
        run_dir: Path,
        is_writer: bool,
        progress: bool = False,
        total_steps: int = 0,
        tensorboard: bool = False,
        wandb: ProfilingConfig | None = None,
        job_config: dict[str, Any] | None = None,
    ) -> None:
        """`wandb`: the profiling config when profiling.wandb is on (its run takes `job_config` as its config)."""
        self.is_writer = is_writer
        self.total_steps = total_steps
        self.file = None
        self.bar = None
        self.tb: TensorBoardSink | None = None
        self.wandb: WandbSink | None = None
        if not is_writer:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = (run_dir / METRICS_FILE).open("a", buffering=1)
        if tensorboard:
            self.tb = TensorBoardSink(run_dir)
        if wandb is not None:
            self.wandb = WandbSink(run_dir, wandb, job_config or {})
        if progress and sys.stdout.isatty():
            self.bar = ProgressBar(total_steps)

    def write(self, metrics: dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(metrics) + "\n")
        for sink in self._extra_sinks():
            sink.scalars(metrics)
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
        """Expert-load heatmap and per-layer scalars to TensorBoard and W&B (the JSONL line is the tracker's)."""
        for sink in self._extra_sinks():
            sink.expert_load(rec)

    def _extra_sinks(self) -> list[TensorBoardSink | WandbSink]:
        return [sink for sink in (self.tb, self.wandb) if sink is not None]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for sink in self._extra_sinks():
            sink.close()
        self.tb = self.wandb = None


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
