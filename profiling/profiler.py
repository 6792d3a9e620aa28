"""The trainer's one handle on profiling: phases, step end (breakdown, throughput, MFU), logging, traces.

The trainer calls, per step: `step_begin(step)`, `phase(name)` around data / forward / backward / grad_sync /
optimizer, `step_end(metrics, layer_stats)`; on logged steps, on every rank, `log(metrics)`; `close()` at
the end. Everything else (what is measured, when, and where it is written) lives in profiling/.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe.config import ModelConfig, MoEConfig
from parallel.dims import Axis
from parallel.parallelize import ParallelModel
from profiling.config import ProfilingConfig
from profiling.expert_load import ExpertLoadTracker, Stats
from profiling.flops import device_peak_tflops, peak_memory_gb, train_flops_per_token
from profiling.sinks import MetricsLog
from profiling.timers import StepTimer
from profiling.trace import TraceProfiler, check_trace_ranks


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
        self.timer = StepTimer(device, p.breakdown_every, nvtx=p.nvtx, collectives=p.collectives and self.world > 1)
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
        self.timer.begin(step, profiler_free=not self.trace.busy)

    def phase(self, name: str) -> contextlib.AbstractContextManager:
        """Times `name` on sampled steps (and marks it for Nsight on CUDA); a no-op otherwise."""
        return self.timer.phase(name)

    def step_end(self, metrics: dict[str, Any], layer_stats: Stats) -> None:
        """Adds the breakdown (sampled steps), throughput and MFU to `metrics`; keeps the routing stats."""
        metrics.update(self.timer.end())
        metrics.update(throughput(metrics["tokens_per_s"], self.world, self.flops_per_token, self.peak_tflops))
        self.layer_stats = layer_stats
        self.trace.step()

    def log(self, metrics: dict[str, Any]) -> None:
        """On every rank at a logged step (collectives inside): peak memory, expert load, then the sinks."""
        peak = torch.tensor([peak_memory_gb(self.device)], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        metrics["peak_mem_gb"] = float(peak)
        rec = None
        if self.tracker is not None:
            biases = {lid: moe.router.expert_bias for lid, moe in self.pm.moe_layers().items()}
            rec = self.tracker.record(int(metrics["step"]), self.layer_stats, biases)
        self.sink.write(metrics)
        if rec is not None:
            self.sink.write_expert_load(rec)

    def close(self) -> None:
        self.trace.close()
        if self.tracker is not None:
            self.tracker.close()
        self.sink.close()
