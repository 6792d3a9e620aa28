"""The trainer's one handle on profiling: phases, step end (breakdown, throughput, MFU), logging, traces.

The trainer calls, per step: `step_begin(step)`, `phase(name)` around data / forward / backward / grad_sync /
optimizer, `step_end(metrics, layer_stats, logged)`; on logging steps, on every rank, `pack(layer_stats)`
(this rank's share of the step's one packed collective) and `unpack(metrics, values)` (the reduced share),
then `write(metrics)`; `close()` at the end. Everything else (what is measured, when, and where it is
written) lives in profiling/.

Nothing here reads the device between logging steps: throughput is the tokens of the steps since the last
logging step over the wall time since then, measured after the logging step's host read has drained the
device, so it is the device's time and costs no synchronisation of its own.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.parallel.dims import Axis
from moeyard.parallel.parallelize import ParallelModel
from moeyard.profiling.config import ProfilingConfig
from moeyard.profiling.expert_load import ExpertLoadTracker, Stats
from moeyard.profiling.flops import device_peak_tflops, peak_memory_gb, train_flops_per_token
from moeyard.profiling.sinks import MetricsLog
from moeyard.profiling.timers import StepTimer
from moeyard.profiling.trace import TraceProfiler, check_trace_ranks


def throughput(tokens_per_s: float, world: int, flops_per_token: float, peak_tflops: float | None) -> dict[str, float]:
    """Per-device tokens/s, model TFLOP/s per device and MFU (the fraction of the device peak)."""
    tflops = flops_per_token * tokens_per_s / world / 1e12
    out = {"tokens_per_s_per_device": tokens_per_s / world, "tflops_per_device": tflops}
    if peak_tflops:
        out["mfu"] = tflops / peak_tflops
    return out


def _ep_rank(pm: ParallelModel) -> int:
    return pm.expert_mesh[Axis.EP.value].get_local_rank() if pm.dims.ep > 1 else 0


class StepProfiler:
    """Owns the step timer, trace profiler, expert-load tracker and metric sinks of one rank."""

    def __init__(
        self,
        p: ProfilingConfig,
        model: ModelConfig,
        moe: MoEConfig,
        seq_len: int,
        tokens_per_step: int,
        pm: ParallelModel,
        device: torch.device,
        run_dir: Path,
        log: MetricsLog,
    ) -> None:
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        check_trace_ranks(p, self.world)
        self.pm, self.device, self.sink = pm, device, log
        self.flops_per_token = train_flops_per_token(model, moe, seq_len)
        self.peak_tflops = device_peak_tflops(device, p.peak_tflops)
        breakdown_every = p.breakdown_every if self.rank in p.breakdown_ranks else 0  # sampled ranks only
        self.timer = StepTimer(device, breakdown_every, nvtx=p.nvtx, collectives=p.collectives and self.world > 1)
        self.tokens_per_step = tokens_per_step
        self.interval_start: float | None = None
        self.interval_steps = 0
        self.expert_load_rec: dict[str, Any] | None = None
        self.trace = TraceProfiler(p, self.rank, device, run_dir)
        self.tracker = None
        if p.expert_load:
            self.tracker = ExpertLoadTracker(
                model,
                moe,
                device,
                ep=pm.dims.ep,
                ep_rank=_ep_rank(pm),
                run_dir=run_dir if self.rank == 0 else None,
                dead_steps=p.dead_expert_steps,
                imbalance_warn=p.imbalance_warn,
            )
        self.layer_stats: Stats = {}

    def step_begin(self, step: int) -> None:
        if self.interval_start is None:  # the first step after a logging step, whose host read drained the device
            self.interval_start = time.perf_counter()
        self.timer.begin(step, profiler_free=not self.trace.busy)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Times `name` on sampled steps (and marks it for Nsight on CUDA); a no-op otherwise."""
        return self.timer.phase(name)

    def step_end(self, metrics: dict[str, Any], layer_stats: Stats, logged: bool) -> None:
        """Adds the breakdown (sampled steps) and, on logging steps, throughput and MFU to `metrics`."""
        metrics.update(self.timer.end())
        self.layer_stats = layer_stats
        self.interval_steps += 1
        if logged:
            elapsed = time.perf_counter() - self.interval_start
            tokens_per_s = self.tokens_per_step * self.interval_steps / elapsed
            metrics.update(step_time_s=elapsed / self.interval_steps, tokens_per_s=tokens_per_s)
            metrics.update(throughput(tokens_per_s, self.world, self.flops_per_token, self.peak_tflops))
            self.interval_start, self.interval_steps = None, 0
        self.trace.step()

    def pack(self, layer_stats: Stats) -> torch.Tensor:
        """This rank's share of a logging step's collective: its peak memory in its own slot of [world] (a
        sum then carries every rank's, and the maximum is taken on the host), then the expert-load rows."""
        slots = torch.zeros(self.world, dtype=torch.float64, device=self.device)
        slots[self.rank] = peak_memory_gb(self.device)
        if self.tracker is None:
            return slots
        biases = {lid: moe.router.expert_bias for lid, moe in self.pm.moe_layers().items()}
        return torch.cat([slots, self.tracker.pack(layer_stats, biases).flatten()])

    def unpack(self, metrics: dict[str, Any], values: list[float]) -> None:
        """The reduced share of `pack` (host values): peak memory into `metrics`, the expert-load record."""
        metrics["peak_mem_gb"] = max(values[: self.world])
        if self.tracker is not None:
            rows = torch.tensor(values[self.world :], dtype=torch.float64).view(len(self.tracker.layer_ids), -1)
            self.expert_load_rec = self.tracker.write_reduced(int(metrics["step"]), rows)

    def write(self, metrics: dict[str, Any]) -> None:
        """Rank 0's sinks: the metrics line, then the expert-load record of the same step."""
        self.sink.write(metrics)
        if self.expert_load_rec is not None:
            self.sink.write_expert_load(self.expert_load_rec)
            self.expert_load_rec = None

    def close(self) -> None:
        self.trace.close()
        if self.tracker is not None:
            self.tracker.close()
        self.sink.close()
