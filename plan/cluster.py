"""The machines a job runs on: which row of the device table (profiling/devices.py, shared with the MFU
meter) and how many ranks per node (cluster.*, else the launcher's sizes).

The achievable fractions of the table's peaks are not there but in calibration.py, where
benchmarks/gpu_check.py output can replace them. For `cluster.gpu=cpu` every rank is one CPU core with one
torch thread (as the CPU benchmarks and tests run ranks): the peak is this CPU's measured single-thread fp32
GEMM rate and the "interconnect" is gloo over loopback, measured once (cpu.py) and cached.
"""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

from moeyard.job.schema import ClusterConfig, JobConfig
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


def planned_cluster(cfg: JobConfig) -> ClusterConfig:
    """`cfg.cluster` with what `moeyard plan` plans for made explicit: each cluster.* field given, else the
    launcher's nodes and ranks per node (what `moeyard train` would start, e.g. an experiment's Slurm sizes),
    and for cluster.gpu=auto cpu when the job trains on it (train.device=cpu), else this machine's GPU.

    ValueError (one line) where none of these names a device kind: planning a GPU job on this CPU's figures
    would answer a question nobody asked."""
    cluster, launcher = cfg.cluster, cfg.launcher
    kind = cluster.gpu
    if kind == "auto":
        kind = "cpu" if cfg.train.device == "cpu" else detect_kind()
        if kind == "cpu" and cfg.train.device != "cpu":
            _refuse_auto(cfg.train.device)
    return replace(
        cluster,
        gpu=kind,
        nodes=cluster.nodes or launcher.nodes_requested(),
        gpus_per_node=cluster.gpus_per_node or launcher.ranks_per_node(),
    )


def _refuse_auto(device: str) -> None:
    kinds = next(f for f in fields(ClusterConfig) if f.name == "gpu").metadata["choices"]
    gpus = "|".join(k for k in kinds if k not in ("auto", "cpu"))
    raise ValueError(
        f"cluster.gpu=auto names no device to plan for: this machine has no GPU and train.device={device} is not"
        f" cpu (rule: set cluster.gpu={gpus} to the ranks' GPU kind, or cluster.gpu=cpu for CPU ranks)"
    )


def ranks_per_node(cfg: JobConfig) -> int:
    """cluster.gpus_per_node, or the launcher's ranks per node."""
    return cfg.cluster.gpus_per_node or cfg.launcher.ranks_per_node()


def check_cluster(cfg: ClusterConfig) -> None:
    """ValueError naming the field, the value and the rule."""
    rules = [
        (cfg.nodes is None or cfg.nodes >= 1, "nodes", cfg.nodes, "must be >= 1, or null (the launcher's)"),
        (
            cfg.gpus_per_node is None or cfg.gpus_per_node >= 1,
            "gpus_per_node",
            cfg.gpus_per_node,
            "must be >= 1, or null (the launcher's ranks per node)",
        ),
        (cfg.memory_gb is None or cfg.memory_gb > 0, "memory_gb", cfg.memory_gb, "must be > 0, or null"),
        (0 <= cfg.memory_margin < 1, "memory_margin", cfg.memory_margin, "must be in [0, 1) (a share of memory)"),
        (cfg.moe_headroom >= 1.0, "moe_headroom", cfg.moe_headroom, "must be >= 1 (a share over the balanced)"),
    ]
    for ok, name, value, rule in rules:
        if not ok:
            raise ValueError(f"cluster.{name}={value} {rule}")
