"""torch.profiler Chrome traces on a wait/warmup/active/repeat schedule, and the CUDA memory snapshot."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from moeyard.profiling.config import ProfilingConfig


def check_trace_ranks(cfg: ProfilingConfig, world: int) -> None:
    """Raises ValueError when profiling.trace_ranks names a rank the job does not have."""
    bad = [r for r in cfg.trace_ranks if not 0 <= r < world]
    if cfg.torch_trace and bad:
        raise ValueError(
            f"profiling.trace_ranks={list(cfg.trace_ranks)} has ranks {bad} outside the job "
            f"(rule: 0 <= rank < world size {world})"
        )


class TraceProfiler:
    """Records RUN_DIR/traces/rank<r>_step<n>.json on listed ranks; opens Perfetto or chrome://tracing.

    One trace per active window: the schedule idles `wait` steps, warms up `warmup`, records `active`, and
    repeats `repeat` times (0 = until the run ends).
    """

    def __init__(self, cfg: ProfilingConfig, rank: int, device: torch.device, run_dir: Path) -> None:
        self.trace_dir = run_dir / "traces"
        self.rank = rank
        self.cuda = device.type == "cuda"
        self.prof: profile | None = None
        self.window = cfg.trace_wait + cfg.trace_warmup + cfg.trace_active
        self.repeat = cfg.trace_repeat
        self.snapshot = cfg.memory_snapshot and rank in cfg.trace_ranks
        if cfg.torch_trace and rank in cfg.trace_ranks:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(
                activities=activities,
                schedule=schedule(
                    wait=cfg.trace_wait, warmup=cfg.trace_warmup, active=cfg.trace_active, repeat=cfg.trace_repeat
                ),
                on_trace_ready=self._write,
                record_shapes=True,
                with_stack=False,
            )
            self.prof.start()
        if self.snapshot and not self.cuda:
            print("moeyard: profiling.memory_snapshot needs CUDA; skipped on CPU", file=sys.stderr)
            self.snapshot = False
        if self.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def _write(self, prof: profile) -> None:
        prof.export_chrome_trace(str(self.trace_dir / f"rank{self.rank}_step{prof.step_num}.json"))

    @property
    def busy(self) -> bool:
        """Whether this profiler holds the (single) kineto session, so another profiler may not start."""
        return self.prof is not None

    def step(self) -> None:
        """Advances the schedule by one training step; stops once the last window is written."""
        if self.prof is None:
            return
        self.prof.step()
        if self.repeat and self.prof.step_num >= self.repeat * self.window:
            self.close_trace()

    def close_trace(self) -> None:
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def close(self) -> None:
        """Stops tracing and writes the memory snapshot (RUN_DIR/traces/memory_rank<r>.pickle)."""
        self.close_trace()
        if self.snapshot:
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(self.trace_dir / f"memory_rank{self.rank}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshot = False
