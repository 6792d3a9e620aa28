"""The profiling group's schema: what is measured, when, and where it is written."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeyard.moe.config import check_fields, choice, require


@dataclass(kw_only=True)
class ProfilingConfig:
    """Throughput/MFU metering, step breakdown, traces and the expert-load tracker."""

    breakdown_every: int = 100
    """Time the step phases every N steps; 0 = never. A sampled step waits for the GPU at every phase (and
    records collectives with torch.profiler), so it is slower than the others: sampled rarely by default;
    pick a multiple of train.log_every, since the breakdown is written with a logging step's metrics."""
    breakdown_ranks: list[int] = field(default_factory=lambda: [0])
    """Ranks that time the breakdown (rank 0 writes metrics.jsonl; others would pay for nothing)."""
    collectives: bool = True
    """On sampled steps of multi-rank runs, also sum time inside collectives from torch.profiler events."""
    nvtx: bool = True
    """NVTX ranges per step and phase on CUDA, for Nsight Systems."""
    torch_trace: bool = False
    """Record torch.profiler Chrome traces into RUN_DIR/traces/."""
    trace_wait: int = 1
    """Trace schedule: idle steps before each window."""
    trace_warmup: int = 1
    """Trace schedule: warm-up steps (profiled, discarded)."""
    trace_active: int = 2
    """Trace schedule: recorded steps per window."""
    trace_repeat: int = 1
    """Trace schedule: windows (0 = until the run ends)."""
    trace_ranks: list[int] = field(default_factory=lambda: [0])
    """Ranks that record traces (and the memory snapshot)."""
    memory_snapshot: bool = False
    """CUDA memory snapshot pickle at the end, on trace_ranks (GPU only)."""
    expert_load: bool = True
    """Write expert_load.jsonl."""
    tensorboard: bool = False
    """Also write TensorBoard scalars and load heatmaps (needs the tensorboard package)."""
    wandb: bool = False
    """Also log scalars and load heatmaps to Weights & Biases (needs `pip install 'moeyard[wandb]'`)."""
    wandb_project: str = "moeyard"
    """The W&B project the run is logged to."""
    wandb_name: str | None = None
    """The W&B run's name; null = the run directory's name."""
    wandb_mode: str = choice("auto", "online", "offline", "disabled")
    """online; offline (files under RUN_DIR/wandb, uploaded later by `wandb sync`); disabled; auto = the
    WANDB_MODE environment variable, else online."""
    progress: bool = True
    """Rich progress bar on rank 0."""
    dead_expert_steps: int = 20
    """Warn when an expert receives no tokens for this many logged steps."""
    imbalance_warn: float = 4.0
    """Warn when max/mean expert load passes this."""
    peak_tflops: float | None = None
    """Override the per-device peak used for MFU."""

    def check(self, world_size: int) -> None:
        """Raises ValueError naming the first field whose value breaks a rule, for a job of `world_size` ranks."""
        check_fields(self, "profiling.")
        for name in ("breakdown_every", "trace_wait", "trace_warmup", "trace_repeat"):
            require(getattr(self, name) >= 0, f"profiling.{name}", getattr(self, name), "must be >= 0")
        for name in ("trace_active", "dead_expert_steps"):
            require(getattr(self, name) >= 1, f"profiling.{name}", getattr(self, name), "must be >= 1")
        require(self.imbalance_warn >= 1, "profiling.imbalance_warn", self.imbalance_warn, "must be >= 1 (max/mean)")
        peak = self.peak_tflops
        require(peak is None or peak > 0, "profiling.peak_tflops", peak, "must be > 0, or null for the device's")
        ranks = {"breakdown_ranks": self.breakdown_ranks, "trace_ranks": self.trace_ranks if self.torch_trace else []}
        for name, listed in ranks.items():
            bad = [r for r in listed if not 0 <= r < world_size]
            rule = f"has ranks {bad} outside the job (rule: 0 <= rank < world size {world_size})"
            require(not bad, f"profiling.{name}", list(listed), rule)
