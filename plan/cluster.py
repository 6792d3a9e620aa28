"""The machines a job runs on: which row of the device table (profiling/devices.py, shared with the MFU
meter) and how many ranks per node.

The achievable fractions of the table's peaks are not there but in calibration.py, where
benchmarks/gpu_check.py output can replace them. For `cluster.gpu=cpu` every rank is one CPU core with one
torch thread (as the CPU benchmarks and tests run ranks): the peak is this CPU's measured single-thread fp32
GEMM rate and the "interconnect" is gloo over loopback, measured once (cpu.py) and cached.
"""

from __future__ import annotations

import os
from pathlib import Path

from moeyard.job.schema import ClusterConfig
from moeyard.profiling.devices import gpu_kind

_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")
"""The NVIDIA driver's per-GPU files (Linux): each `information` names its GPU's model."""


def gpu_names(root: Path = _NVIDIA_GPUS) -> list[str]:
    """This machine's NVIDIA GPU models, as the driver names them, without initialising CUDA.

    The launcher asks before it starts any rank: torch.cuda's name and capability queries would create a
    CUDA context here (memory on the GPU a rank needs, and a process that cannot fork a CUDA user), and even
    torch.cuda.is_available() initialises the driver. The driver's own files need neither."""
    names = []
    for info in sorted(root.glob("*/information")):
        model = next((ln for ln in info.read_text(errors="replace").splitlines() if ln.startswith("Model:")), None)
        if model is not None:
            names.append(model.split(":", 1)[1].strip())
    return names


def detect_kind(names: list[str] | None = None) -> str:
    """This machine's device kind from its GPU names (default `gpu_names()`): cpu without one; ValueError
    naming cluster.gpu for a GPU the device table lacks (rather than guessing its memory and speed)."""
    names = gpu_names() if names is None else names
    if not names:
        return "cpu"
    kind = gpu_kind(names[0])
    if kind is None:
        raise ValueError(
            f"cluster.gpu=auto found the GPU {names[0]!r}, which the device table lacks "
            "(rule: set cluster.gpu to the nodes' GPU kind, e.g. h100)"
        )
    return kind


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
