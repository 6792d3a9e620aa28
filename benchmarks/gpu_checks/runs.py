"""Training runs of the real `Trainer`, configured as `moeyard train` configures it, timed and measured.

Each run is a `JobConfig` built from the model presets' objects (moe/presets.py) without Hydra, checked by
`moeyard train`'s own validation (launch/validate.py, which also runs the memory pre-flight), and trained by
`Trainer.fit` in a throw-away run directory: data from the standard library's sources, bf16 autocast over fp32
master weights (train.dtype=bf16), AdamW as the trainer builds it (fused on CUDA), no checkpoints, no eval,
no sampled breakdown (a sampled step waits for the device at every phase), metrics every `steps // 2` steps.

Steps are timed by a callback on the trainer's own hook, `on_step_end`: a CUDA event per step end (the
interval between two ends is one step as the device ran it, host waits included) or the wall clock on CPU.
The planner (plan/planner.py) predicts the same job's peak memory; on CUDA it is set against
`torch.cuda.max_memory_allocated` over the whole run (build, steps and optimizer state).
"""

from __future__ import annotations

import contextlib
import gc
import io
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from moeyard.job.schema import ClusterConfig, JobConfig
from moeyard.launch.validate import validate
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.parallel.config import ParallelConfig
from moeyard.plan.planner import layout_of, make_planner
from moeyard.profiling.config import ProfilingConfig
from moeyard.profiling.devices import gpu_kind
from moeyard.profiling.flops import device_peak_tflops, peak_memory_gb, train_flops_per_token
from moeyard.profiling.profiler import throughput
from moeyard.train.callbacks import Callback
from moeyard.train.checkpointing import CheckpointConfig
from moeyard.train.config import RunConfig, TrainConfig
from moeyard.train.data import DataConfig
from moeyard.train.optim import OptimConfig
from moeyard.train.trainer import Trainer


@dataclass(frozen=True)
class ModelCase:
    """A model to train and its batch: `batch` sequences of `seq_len` tokens per step, in one micro-batch."""

    model: ModelConfig
    moe: MoEConfig
    batch: int
    seq_len: int


@dataclass(frozen=True)
class Variant:
    """How the blocks run: torch.compile (parallel.compile) and activation checkpointing."""

    compile: bool
    ac: str = "none"
    """parallel.activation_checkpoint: none or full."""

    def label(self) -> str:
        return ("compile" if self.compile else "eager") + ("" if self.ac == "none" else f" ac={self.ac}")


ALL_VARIANTS = tuple(Variant(compile=c, ac=ac) for c in (False, True) for ac in ("none", "full"))


def job_config(case: ModelCase, variant: Variant, device: torch.device, steps: int, run_dir: Path) -> JobConfig:
    """The job `moeyard train model=... train.dtype=bf16 parallel.compile=... ...` would compose for one rank."""
    return JobConfig(
        model=case.model,
        moe=case.moe,
        optim=OptimConfig(warmup_steps=min(10, steps)),
        train=TrainConfig(
            steps=steps,
            batch_size=case.batch,
            seq_len=case.seq_len,
            micro_batches=1,
            dtype="bf16",
            device=device.type,
            eval_every=0,
            log_every=max(1, steps // 2),
        ),
        data=DataConfig(source="stdlib"),
        parallel=ParallelConfig(dp=1, activation_checkpoint=variant.ac, compile=variant.compile),
        profiling=ProfilingConfig(breakdown_every=0, progress=False),
        checkpoint=CheckpointConfig(enabled=False),
        run=RunConfig(dir=str(run_dir)),
        # No pre-flight stop: a run the planner predicts not to fit still runs, and its peak is measured.
        cluster=ClusterConfig(gpu=cluster_gpu(device), gpus_per_node=1, preflight=False),
    )


def cluster_gpu(device: torch.device) -> str:
    """cluster.gpu for `device`: its device-table row by CUDA's name for it (the driver's files, where `moeyard
    train` looks without initialising CUDA, can be missing in a container), else auto; cpu without CUDA."""
    if device.type != "cuda":
        return "cpu"
    kind = gpu_kind(torch.cuda.get_device_name(device))
    allowed = next(f for f in fields(ClusterConfig) if f.name == "gpu").metadata["choices"]
    return kind if kind in allowed else "auto"


class StepClock(Callback):
    """Marks the end of every step: a CUDA event (no host wait) on CUDA, the wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self, warmup: int) -> list[float]:
        """Milliseconds of each step after the first `warmup` (>= 1: a step is the time since the last end)."""
        marks = self.marks[warmup - 1 :]
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in pairwise(marks)]
        return [(b - a) * 1e3 for a, b in pairwise(marks)]


def predicted_peak(cfg: JobConfig) -> dict[str, Any]:
    """The planner's peak memory for this job's one rank, in GB, by part."""
    planner = make_planner(cfg, measure=False)
    worst = planner.predict(layout_of(cfg, 1)).worst
    parts = ("model_state", "activations", "working", "buffers")
    return {"device": planner.device.name, "total_gb": worst.total / 1e9} | {
        f"{part}_gb": getattr(worst, part) / 1e9 for part in parts
    }


def compile_counts() -> dict[str, Any]:
    """What torch.compile captured since the last reset: graphs, graph breaks (by reason) and recompiles."""
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(breaks.values()),
        "break_reasons": dict(sorted(breaks.items(), key=lambda kv: -kv[1])[:3]),
        "recompiles": sum(counters["recompiles"].values()),
    }


def reset_device(device: torch.device) -> None:
    """Frees the last run's memory and compiled graphs, and restarts the peak-memory and compile counters."""
    gc.collect()
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def train_run(case: ModelCase, variant: Variant, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Validates and trains one job; returns its record (gpu_check.py's JSON `models[]`)."""
    rec: dict[str, Any] = {
        "model": case.model.name,
        "model_config": asdict(case.model),  # the shapes `moeyard plan --calibration` predicts this run from
        "moe_config": asdict(case.moe),
        "precision": "autocast",  # train.dtype=bf16: bf16 autocast over fp32 master weights
        "compile": variant.compile,
        "activation_checkpoint": variant.ac,
        "batch": case.batch,
        "seq_len": case.seq_len,
        "steps": steps,
        "warmup": warmup,
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        cfg = job_config(case, variant, device, steps, Path(tmp) / "run")
        validate(cfg, 1)
        try:
            rec["predicted_peak"] = predicted_peak(cfg)
        except ValueError as err:  # e.g. a GPU the device table lacks: the run still trains
            rec["predicted_peak"] = {"error": str(err)}
        reset_device(device)
        clock, output = StepClock(device), io.StringIO()
        with contextlib.redirect_stdout(output):  # the trainer's own lines go to the record, not the table
            trainer = Trainer(cfg, callbacks=[clock])
            history = trainer.fit()
        trainer.guard.exit_if_stopped()  # Ctrl-C or SIGTERM ends the step, then the whole check (no next run)
        rec["optimizer"] = "fused" if trainer.optimizer.defaults.get("fused") else "foreach"
        rec["params"] = sum(p.numel() for _, p in trainer.pm.named_parameters())
        del trainer
    rec["trainer_output"] = output.getvalue().splitlines()[-20:]
    ms = clock.step_ms(warmup)
    rec |= timing(case, ms, device)
    rec["peak_mem_gb"] = peak_memory_gb(device) if device.type == "cuda" else None
    losses = [(int(m["step"]), m["loss"]) for m in history if "loss" in m]
    rec["losses"] = dict(losses)
    rec["loss_first"], rec["loss_last"] = losses[0][1], losses[-1][1]
    if variant.compile:
        rec["compiled"] = compile_counts()
    reset_device(device)  # compiled graphs hold the model's parameters until torch._dynamo lets them go
    return rec


def timing(case: ModelCase, ms: list[float], device: torch.device) -> dict[str, Any]:
    """Step times, tokens/s, model TFLOP/s and MFU (profiling/flops.py's convention) of timed steps `ms`."""
    tokens_per_s = case.batch * case.seq_len * len(ms) / (sum(ms) / 1e3)
    flops_per_token = train_flops_per_token(case.model, case.moe, case.seq_len)
    rates = throughput(tokens_per_s, 1, flops_per_token, device_peak_tflops(device))
    return {
        "step_ms_median": statistics.median(ms),
        "step_ms_mean": sum(ms) / len(ms),
        "tokens_per_s": tokens_per_s,
        "train_flops_per_token": flops_per_token,
        "tflops": rates["tflops_per_device"],
        "mfu": rates.get("mfu"),
    }
