"""The configuration of one rank's run: the loop, the run directory, and the components' own configs.

`TrainerConfig` is everything a rank needs to train; the launcher's `JobConfig` adds how ranks start.
Each component keeps its config dataclass beside it (OptimConfig in train/optim.py, DataConfig in
train/data.py, CheckpointConfig in train/checkpointing.py, ProfilingConfig in profiling/config.py) and takes
only that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeyard.moe.config import ModelConfig, MoEConfig, choice
from moeyard.parallel.config import ParallelConfig
from moeyard.profiling.config import ProfilingConfig
from moeyard.train.checkpointing import CheckpointConfig
from moeyard.train.data import DataConfig
from moeyard.train.optim import OptimConfig


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Global batch, in sequences per step (over all data-parallel ranks and micro-batches)."""
    seq_len: int = 64
    """Tokens per sequence."""
    micro_batches: int = 2
    """Micro-batches per step (gradient accumulation; pipeline micro-batches); must divide batch_size.
    The batch-level aux loss is defined per micro-batch, so compare runs at equal micro_batches."""
    seed: int = 1234
    """Seeds weights (per tensor name), data order and dropout-free RNG state."""
    dtype: str = choice("fp32", "bf16")
    """Compute dtype: bf16 autocast on CUDA, fp32 master weights always."""
    device: str = choice("auto", "cpu", "cuda")
    """auto: CUDA when available, else CPU."""
    eval_every: int = 50
    """Held-out eval every N steps and at the end (0 = never)."""
    eval_batches: int = 4
    """Global batches averaged for the eval loss."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    deterministic: bool = True
    """Deterministic algorithms (bitwise-repeatable on CPU)."""
    resume: str = "none"
    """none; auto: the latest complete save in run.dir/checkpoints (else start fresh); or a path."""
    init_from: str | None = None
    """Start from these weights at step 0 (fresh optimizer): a checkpoint, a run dir or a Hugging Face dir."""
    upcycle: bool = False
    """init_from is a dense Hugging Face Llama/Qwen3 dir: every expert starts as its FFN (train/upcycle.py)."""
    upcycle_granularity: int = 1
    """Upcycling: each dense FFN splits into this many experts of width intermediate_size / g; moe.num_experts
    is g x the copies, moe.top_k a multiple of g and moe.route_scale = g (the step-0 function stays dense)."""
    nonfinite: str = choice("halt", "skip")
    """A step with NaN/Inf loss or gradients: stop with an error, or skip its update (logged in metrics)."""
    callbacks: list[Any] = field(default_factory=list)
    """Trainer callbacks (train/callbacks.py), each {_target_: package.module.Name, **its arguments}."""


@dataclass(kw_only=True)
class RunConfig:
    """The run directory."""

    dir: str | None = None
    """Where config.yaml, metrics and checkpoints go (default runs/<time>-<model>)."""
    name: str | None = None


@dataclass(kw_only=True)
class TrainerConfig:
    """Everything one rank's run reads (the launcher's JobConfig adds `launcher`)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
