"""Step breakdown on sampled steps: phase timers, and time inside collectives from torch.profiler.

Phases (data, forward, backward, grad_sync, optimizer) are timed with the wall clock on CPU and CUDA events on
GPU; only a sampled step reads them back, so other steps gain no host synchronisation. Collectives are timed
from the communication backend's own profiler events on the sampled step: gloo runs each collective on a
worker thread under a "gloo:<op>" range, NCCL as "nccl..." GPU kernels. Timing them from Python instead would
miss the ones issued from C++ (the backward all-to-all of functional collectives, DTensor's lazy waits, FSDP's
asynchronous work handles). The profiler's per-op recording slows a sampled step of an op-bound model, so
profiling.collectives can turn it off.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import torch

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # else kineto prints two lines per profiler start and stop

# Name fragments (lower case) of each collective kind, checked in this order ("reduce_scatter" before "gather").
COMM_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("all_to_all", ("all_to_all", "alltoall")),
    ("all_reduce", ("reduce_scatter", "reducescatter", "all_reduce", "allreduce")),
    ("all_gather", ("all_gather", "allgather")),
    ("send_recv", ("send", "recv")),
)


def comm_kind(name: str) -> str | None:
    """Collective kind of a backend profiler event ("gloo:all_to_all", "ncclDevKernel_AllReduce..."), or None.

    gloo's "gloo:<op>" ranges cover the work on its worker thread. For NCCL only the GPU kernels count: its
    CPU-side "nccl:<op>" ranges time the launch, not the transfer.
    """
    low = name.lower()
    if not (low.startswith("gloo:") or (low.startswith("nccl") and not low.startswith("nccl:"))):
        return None
    return next((kind for kind, frags in COMM_KINDS if any(f in low for f in frags)), "other")


def comm_times_ms(events: list[tuple[str, float]]) -> dict[str, float]:
    """Sums (name, duration_ms) backend events into comm_<kind>_ms keys."""
    out: dict[str, float] = {}
    for name, ms in events:
        kind = comm_kind(name)
        if kind is not None:
            out[f"comm_{kind}_ms"] = out.get(f"comm_{kind}_ms", 0.0) + ms
    return out


class StepTimer:
    """Times named phases of sampled steps; NVTX ranges around every phase on CUDA when asked."""

    def __init__(self, device: torch.device, every: int, nvtx: bool = False, collectives: bool = False) -> None:
        self.cuda = device.type == "cuda"
        self.every = every
        self.nvtx = nvtx and self.cuda
        self.collectives = collectives
        self.sampled = False
        self.spans: list[tuple[str, object, object]] = []
        self.step_start: object = None
        self.comm_prof: torch.profiler.profile | None = None

    def is_sampled(self, step: int) -> bool:
        """Steps numbered as in metrics (step + 1) that are multiples of `every`."""
        return self.every > 0 and (step + 1) % self.every == 0

    def _now(self) -> object:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _ms(self, start: object, end: object) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3

    def begin(self, step: int, profiler_free: bool = True) -> None:
        """Starts step `step` (0-based); on a sampled step, also the collective profiler when it is free."""
        self.sampled = self.is_sampled(step)
        if self.nvtx:
            torch.cuda.nvtx.range_push(f"step {step + 1}")
        if not self.sampled:
            return
        self.spans = []
        if self.collectives and profiler_free:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.comm_prof = torch.profiler.profile(activities=activities)
            self.comm_prof.__enter__()
        self.step_start = self._now()

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        start = self._now() if self.sampled else None
        try:
            yield
        finally:
            if self.sampled:
                self.spans.append((name, start, self._now()))
            if self.nvtx:
                torch.cuda.nvtx.range_pop()

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Context manager timing one phase; a shared no-op on steps that are neither sampled nor traced."""
        if not (self.sampled or self.nvtx):
            return contextlib.nullcontext()
        return self._timed(name)

    def end(self) -> dict[str, float]:
        """Ends the step; on a sampled step returns time_<phase>_ms, time_step_ms, time_other_ms, comm_*_ms."""
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        if not self.sampled:
            return {}
        step_end = self._now()
        if self.cuda:
            step_end.synchronize()  # the one host sync, on sampled steps only
        out: dict[str, float] = {}
        for name, start, end in self.spans:
            out[f"time_{name}_ms"] = out.get(f"time_{name}_ms", 0.0) + self._ms(start, end)
        out["time_step_ms"] = self._ms(self.step_start, step_end)
        out["time_other_ms"] = max(0.0, out["time_step_ms"] - sum(v for k, v in out.items() if k != "time_step_ms"))
        if self.comm_prof is not None:
            self.comm_prof.__exit__(None, None, None)
            events = self.comm_prof.profiler.kineto_results.events()
            out.update(comm_times_ms([(e.name(), e.duration_ns() / 1e6) for e in events]))
            self.comm_prof = None
        return out
