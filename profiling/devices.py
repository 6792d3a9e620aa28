"""The device table, read by the profiler's MFU and by the planner, and this CPU's measured rates.

A device is described by what those read: memory, peak dense matmul rate, memory bandwidth, and the
per-rank, per-direction bandwidth and latency of a collective inside a node (NVLink) and between nodes
(InfiniBand). GPU rows come from NVIDIA's data sheets (dense, no sparsity); the achievable fractions of these
peaks are not here but in the planner's calibration. A CPU's rates are measured, once per CPU model, torch
thread count and torch build, and kept in one file-locked cache (`cached`): the profiler's GEMM peak and the
planner's rates (plan/cpu.py) both go through it.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    """One rank's device and links, as the MFU meter and the planner's memory and time models read them."""

    name: str
    memory_bytes: float
    """Device memory as torch.cuda reports total_memory (host RAM per rank for cpu)."""
    reserved_bytes: float
    """Never available to tensors: CUDA context, cuBLAS workspaces, NCCL buffers (a stated overhead)."""
    fragmentation: float
    """Fraction of the rest the caching allocator loses to fragmentation (a stated overhead)."""
    peak_tflops: float
    """Dense matmul peak per rank: bf16 tensor cores on a GPU, measured fp32 GEMM on a CPU core."""
    fp32_tflops: float
    """Matmul peak when training in fp32 (TF32 off, as torch defaults; the same as peak_tflops on a CPU)."""
    hbm_gbps: float
    """Device memory bandwidth, GB/s."""
    intra_gbps: float
    """Per-rank, per-direction link bandwidth inside a node (NVLink; gloo loopback for cpu), GB/s."""
    inter_gbps: float
    """Per-rank, per-direction bandwidth between nodes (InfiniBand, one NIC per GPU), GB/s."""
    intra_latency_s: float
    inter_latency_s: float
    fp8_tflops: float = 0.0
    """Dense FP8 peak (0 = none); only the published comparison uses it (MoEyard trains in bf16 or fp32)."""
    collective_gbps: tuple[tuple[str, float], ...] = ()
    """Per kind of collective (all_reduce, all_gather, reduce_scatter, all_to_all, send), its own bus
    bandwidth inside a node where it differs from intra_gbps: gloo's differ by up to 6x on a CPU."""

    def with_cpu_rates(self, rates: dict) -> DeviceSpec:
        """This spec with a CPU's measured (or nominal) rates: its fp32 GEMM rate as the peak, copy
        bandwidth as memory bandwidth, gloo loopback as every link."""
        return replace(
            self,
            peak_tflops=rates["peak_tflops"],
            fp32_tflops=rates["peak_tflops"],
            hbm_gbps=rates["hbm_gbps"],
            intra_gbps=rates["link_gbps"],
            inter_gbps=rates["link_gbps"],
            intra_latency_s=rates["latency_s"],
            inter_latency_s=rates["latency_s"],
            collective_gbps=tuple(sorted(rates.get("collective_gbps", {}).items())),
        )

    @property
    def usable_bytes(self) -> float:
        return (self.memory_bytes - self.reserved_bytes) * (1.0 - self.fragmentation)


_RESERVED = 2.5e9
"""CUDA context (about 0.5 GB), cuBLAS/cuDNN workspaces and NCCL's channel buffers (about 1-2 GB at 8 ranks)."""
_FRAGMENTATION = 0.05
_HOPPER = dict(reserved_bytes=_RESERVED, fragmentation=_FRAGMENTATION, intra_latency_s=10e-6, inter_latency_s=20e-6)
_H100_SXM = dict(_HOPPER, peak_tflops=989.4, fp32_tflops=66.9, fp8_tflops=1978.9, inter_gbps=50.0)

GPUS: dict[str, DeviceSpec] = {
    # NVLink 4: 900 GB/s both directions; ConnectX-7 NDR 400 Gb/s per GPU.
    "h100": DeviceSpec(name="H100 SXM 80GB", memory_bytes=79.1 * GIB, hbm_gbps=3350.0, intra_gbps=450.0, **_H100_SXM),
    "h200": DeviceSpec(name="H200 SXM 141GB", memory_bytes=139.8 * GIB, hbm_gbps=4800.0, intra_gbps=450.0, **_H100_SXM),
    # NVLink cut to 400 GB/s: DeepSeek-V3 reports 160 GB/s achieved, and IB 50 GB/s per GPU.
    "h800": DeviceSpec(name="H800 SXM 80GB", memory_bytes=79.1 * GIB, hbm_gbps=3350.0, intra_gbps=160.0, **_H100_SXM),
    # PCIe cards: an NVLink bridge of 600 GB/s both directions joins pairs.
    "h100_pcie": DeviceSpec(
        name="H100 PCIe 80GB",
        memory_bytes=79.1 * GIB,
        peak_tflops=756.0,
        fp32_tflops=51.2,
        fp8_tflops=1513.0,
        hbm_gbps=2000.0,
        intra_gbps=300.0,
        inter_gbps=50.0,
        **_HOPPER,
    ),
    "h100_nvl": DeviceSpec(
        name="H100 NVL 94GB",
        memory_bytes=93.6 * GIB,
        peak_tflops=835.0,
        fp32_tflops=60.0,
        fp8_tflops=1670.0,
        hbm_gbps=3900.0,
        intra_gbps=300.0,
        inter_gbps=50.0,
        **_HOPPER,
    ),
    # NVLink 3: 600 GB/s both directions; HDR 200 Gb/s per GPU.
    "a100": DeviceSpec(
        name="A100 SXM 80GB",
        memory_bytes=79.2 * GIB,
        peak_tflops=312.0,
        fp32_tflops=19.5,
        hbm_gbps=2039.0,
        intra_gbps=300.0,
        inter_gbps=25.0,
        **_HOPPER,
    ),
}
"""Data-sheet rows; memory as torch.cuda reports total_memory."""

_CUDA_NAMES = (
    ("H200", "h200"),
    ("H800", "h800"),
    ("H100 PCIe", "h100_pcie"),
    ("H100 NVL", "h100_nvl"),
    ("H100", "h100"),
    ("A100", "a100"),
)
"""Matched in order against torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3" (SXM)."""


def gpu_kind(device_name: str) -> str | None:
    """The GPUS row of a CUDA device name, or None for a GPU not in the table."""
    return next((kind for key, kind in _CUDA_NAMES if key in device_name), None)


def gpu_peak_tflops(device_name: str) -> float | None:
    """bf16 dense peak of a known GPU, or None."""
    kind = gpu_kind(device_name)
    return GPUS[kind].peak_tflops if kind else None


# ---------------------------------------------------------------------------------------------- this CPU


def measure_cpu_tflops(n: int = 1024, reps: int = 8) -> float:
    """Best fp32 GEMM rate of an n x n x n matmul with this process's torch threads (TFLOP/s)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool start and caches
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def cpu_key(threads: int | None = None) -> str:
    """Identifies what a CPU rate depends on: CPU model, torch threads (default: this process's), torch build."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}|threads={threads or torch.get_num_threads()}|torch={torch.__version__}"


def cache_dir() -> Path:
    """$MOEYARD_CACHE, else $XDG_CACHE_HOME/moeyard, else ~/.cache/moeyard."""
    if "MOEYARD_CACHE" in os.environ:
        return Path(os.environ["MOEYARD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moeyard"


def cached(name: str, key: str, measure: Callable[[], Any], cache: Path | None = None) -> Any:
    """`measure()`, kept under `key` in the JSON file cache_dir()/`name` (or `cache`) and measured once.

    Processes starting together take a file lock, so one measures alone while the others wait and then read
    (two ranks measuring at once would each see the other's load). A read-only cache directory measures
    every time rather than fail.
    """
    path = cache or cache_dir() / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 (held for the whole measurement)
    except OSError:
        return measure()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(path.read_text()) if path.exists() else {}
        if key not in table:
            table[key] = measure()
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(table, indent=1))
            os.replace(tmp, path)
    return table[key]


def cpu_peak_tflops(cache: Path | None = None) -> float:
    """This CPU's fp32 GEMM peak with this process's torch threads, measured once and cached."""
    return float(cached("cpu_peak.json", cpu_key(), measure_cpu_tflops, cache))
