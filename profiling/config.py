"""The profiling group's schema: what is measured, when, and where it is written."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class ProfilingConfig:
    """Throughput/MFU metering, step breakdown, traces and the expert-load tracker."""

    breakdown_every: int = 10
    """Time the step phases every N steps (sampling avoids a host sync per step on GPU); 0 = never."""
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
    progress: bool = True
    """Rich progress bar on rank 0."""
    dead_expert_steps: int = 20
    """Warn when an expert receives no tokens for this many logged steps."""
    imbalance_warn: float = 4.0
    """Warn when max/mean expert load passes this."""
    peak_tflops: float | None = None
    """Override the per-device peak used for MFU."""
