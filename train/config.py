"""The configuration of one rank's run: the loop, the run directory, and the components' own configs.

`TrainerConfig` is everything a rank needs to train; the launcher's `JobConfig` adds how ranks start.
Each component keeps its config dataclass beside it (OptimConfig in train/optim.py, DataConfig in
train/data.py, CheckpointConfig in train/checkpointing.py, ProfilingConfig in profiling/config.py) and takes
only that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeyard.moe.config import ModelConfig, MoEConfig, check_fields, choice, require
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
    dtype: str = choice("auto", "fp32", "bf16")
    """Compute dtype, with fp32 master weights always: bf16 autocast, fp32, or auto (bf16 on CUDA, where the
    fused kernels want it; fp32 on CPU, where the layouts are proven against one process in fp32)."""
    device: str = choice("auto", "cpu", "cuda")
    """auto: CUDA when available, else CPU."""
    eval_every: int = 50
    """Held-out eval every N steps and at the end (0 = never)."""
    eval_batches: int = 4
    """Global batches averaged for the eval loss."""
    log_every: int = 10
    """Write a metrics.jsonl line every N steps (and at the last). A logging step reads the device back, so
    a GPU waits for its host once per N steps; 1 shows every step."""
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
    mtp_loss_coef: float = 0.3
    """Weight lambda of the multi-token-prediction loss, lambda / D times the sum of the D modules' mean
    cross-entropies (model.mtp_layers; DeepSeek-V3: 0.3 for the first 10T tokens, then 0.1)."""
    callbacks: list[Any] = field(default_factory=list)
    """Trainer callbacks (train/callbacks.py), each {_target_: package.module.Name, **its arguments}."""

    def check(self) -> None:
        """Raises ValueError naming the first field whose value breaks a rule of its own."""
        check_fields(self, "train.")
        require(self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        require(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        require(self.seq_len >= 2, "train.seq_len", self.seq_len, "must be >= 2")
        require(self.micro_batches >= 1, "train.micro_batches", self.micro_batches, "must be >= 1")
        micro = f"must be divisible by train.micro_batches={self.micro_batches}"
        require(self.batch_size % self.micro_batches == 0, "train.batch_size", self.batch_size, micro)
        require(self.eval_every >= 0, "train.eval_every", self.eval_every, "must be >= 0 (0 = never)")
        require(self.eval_batches >= 1, "train.eval_batches", self.eval_batches, "must be >= 1")
        require(self.log_every >= 1, "train.log_every", self.log_every, "must be >= 1")
        require(self.mtp_loss_coef >= 0, "train.mtp_loss_coef", self.mtp_loss_coef, "must be >= 0")
        require(bool(self.resume), "train.resume", self.resume, "must be none, auto or a checkpoint path")
        g = self.upcycle_granularity
        require(g >= 1, "train.upcycle_granularity", g, "must be >= 1")
        require(self.upcycle or g == 1, "train.upcycle_granularity", g, "needs train.upcycle=true")
        dense = "needs train.init_from=a dense Hugging Face Llama/Qwen3 dir"
        require(not self.upcycle or bool(self.init_from), "train.upcycle", True, dense)


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


def computes_in_bf16(dtype: str, device_type: str) -> bool:
    """Whether train.dtype=`dtype` trains under bf16 autocast on a `device_type` device ("cuda", "cpu")."""
    return dtype == "bf16" or (dtype == "auto" and device_type == "cuda")
