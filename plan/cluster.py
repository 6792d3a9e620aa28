"""The machines a job runs on: the `cluster` config (the Hydra schema of `cluster.*`) and the device tables.

A device is described by what the planner's models read: memory, peak dense matmul rate, memory bandwidth,
and the per-rank, per-direction bandwidth and latency of a collective inside a node (NVLink) and between nodes
(InfiniBand). GPU rows come from NVIDIA's data sheets (dense, no sparsity); the achievable fractions of these
peaks are not here but in calibration.py, where benchmarks/gpu_check.py output can replace them. For
`cluster.gpu=cpu` every rank is one CPU core with one torch thread (as the CPU benchmarks and tests run ranks):
the peak is this CPU's measured single-thread fp32 GEMM rate and the "interconnect" is gloo over loopback,
measured once (calibration.py) and cached.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from moeyard.job.schema import ClusterConfig

GIB = 2**30


@dataclass(frozen=True)
class DeviceSpec:
    """One rank's device and links, as the memory and time models read them."""

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


_GPU_RESERVED = 2.5e9
"""CUDA context (about 0.5 GB), cuBLAS/cuDNN workspaces and NCCL's channel buffers (about 1-2 GB at 8 ranks)."""
_GPU_FRAGMENTATION = 0.05

GPUS: dict[str, DeviceSpec] = {
    "h100": DeviceSpec(
        name="H100 SXM 80GB",
        memory_bytes=79.1 * GIB,
        reserved_bytes=_GPU_RESERVED,
        fragmentation=_GPU_FRAGMENTATION,
        peak_tflops=989.4,
        fp32_tflops=66.9,
        fp8_tflops=1978.9,
        hbm_gbps=3350.0,
        intra_gbps=450.0,  # NVLink 4: 900 GB/s both directions
        inter_gbps=50.0,  # ConnectX-7 NDR 400 Gb/s per GPU
        intra_latency_s=10e-6,
        inter_latency_s=20e-6,
    ),
    "h200": DeviceSpec(
        name="H200 SXM 141GB",
        memory_bytes=139.8 * GIB,
        reserved_bytes=_GPU_RESERVED,
        fragmentation=_GPU_FRAGMENTATION,
        peak_tflops=989.4,
        fp32_tflops=66.9,
        fp8_tflops=1978.9,
        hbm_gbps=4800.0,
        intra_gbps=450.0,
        inter_gbps=50.0,
        intra_latency_s=10e-6,
        inter_latency_s=20e-6,
    ),
    "h800": DeviceSpec(
        name="H800 SXM 80GB",
        memory_bytes=79.1 * GIB,
        reserved_bytes=_GPU_RESERVED,
        fragmentation=_GPU_FRAGMENTATION,
        peak_tflops=989.4,
        fp32_tflops=66.9,
        fp8_tflops=1978.9,
        hbm_gbps=3350.0,
        intra_gbps=160.0,  # NVLink cut to 400 GB/s; DeepSeek-V3 reports 160 GB/s achieved
        inter_gbps=50.0,  # DeepSeek-V3 report: IB 50 GB/s per GPU
        intra_latency_s=10e-6,
        inter_latency_s=20e-6,
    ),
    "a100": DeviceSpec(
        name="A100 SXM 80GB",
        memory_bytes=79.2 * GIB,
        reserved_bytes=_GPU_RESERVED,
        fragmentation=_GPU_FRAGMENTATION,
        peak_tflops=312.0,
        fp32_tflops=19.5,
        hbm_gbps=2039.0,
        intra_gbps=300.0,  # NVLink 3: 600 GB/s both directions
        inter_gbps=25.0,  # HDR 200 Gb/s per GPU
        intra_latency_s=10e-6,
        inter_latency_s=20e-6,
    ),
}
"""Data-sheet rows; memory as torch.cuda reports total_memory."""

_CUDA_NAMES = (("H200", "h200"), ("H800", "h800"), ("H100", "h100"), ("A100", "a100"))


def detect_kind() -> str:
    """This machine's device kind: its CUDA GPU by name when known, else cpu."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name()
    return next((kind for key, kind in _CUDA_NAMES if key in name), "h100")


def resolve_kind(cfg: ClusterConfig) -> str:
    return detect_kind() if cfg.gpu == "auto" else cfg.gpu


def ranks_per_node(cfg: ClusterConfig, kind: str) -> int:
    """cluster.gpus_per_node, or its default: 8 GPUs, or one rank per CPU core."""
    if cfg.gpus_per_node > 0:
        return cfg.gpus_per_node
    return (os.cpu_count() or 1) if kind == "cpu" else 8


def check_cluster(cfg: ClusterConfig) -> None:
    """ValueError naming the field, the value and the rule."""
    rules = [
        (cfg.nodes >= 1, "nodes", cfg.nodes, "must be >= 1"),
        (cfg.gpus_per_node >= 0, "gpus_per_node", cfg.gpus_per_node, "must be >= 0 (0 = the kind's default)"),
        (cfg.memory_gb is None or cfg.memory_gb > 0, "memory_gb", cfg.memory_gb, "must be > 0, or null"),
        (cfg.moe_headroom >= 1.0, "moe_headroom", cfg.moe_headroom, "must be >= 1 (a share over the balanced)"),
    ]
    for ok, name, value, rule in rules:
        if not ok:
            raise ValueError(f"cluster.{name}={value} {rule}")
