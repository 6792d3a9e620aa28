"""The job configuration: structured-config schema, composition from `conf/`, validation, the resolved file.

The dataclasses below are the Hydra schema, so a mistyped key or a value of the wrong type is an error at
composition time. `compose()` runs once, in the launching process; every rank reads the resolved
`config.yaml` it wrote into the run directory (composing per rank could disagree on timestamps).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from moe.config import ModelConfig, MoEConfig, choice
from parallel.config import ParallelConfig


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases or router bias)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    fused: str = choice("auto", "on", "off")
    """Fused AdamW kernel (auto: on CUDA only; the foreach kernel elsewhere)."""


@dataclass(kw_only=True)
class TrainConfig:
    """The training loop."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 8
    """Global batch, in sequences per step (over all data-parallel ranks and micro-batches)."""
    seq_len: int = 64
    """Tokens per sequence."""
    micro_batches: int = 2
    """Micro-batches per step (gradient accumulation; pipeline micro-batches); must divide batch_size.
    The batch-level aux loss is defined per micro-batch, so compare runs at equal micro_batches."""
    seed: int = 1234
    """Seeds weights (per tensor name), data order and dropout-free RNG state."""
    dtype: str = choice("fp32", "bf16")
    """Compute dtype: bf16 autocast on CUDA, fp32 master weights always."""
    device: str = choice("auto", "cpu", "cuda")
    """auto: CUDA when available, else CPU."""
    eval_every: int = 50
    """Held-out eval every N steps and at the end (0 = never)."""
    eval_batches: int = 4
    """Global batches averaged for the eval loss."""
    log_every: int = 1
    """Write a metrics.jsonl line every N steps."""
    deterministic: bool = True
    """Deterministic algorithms (bitwise-repeatable on CPU)."""
    resume: str = "none"
    """none; auto: the latest complete save in run.dir/checkpoints (else start fresh); or a path."""
    init_from: str | None = None
    """Start from these weights at step 0 (fresh optimizer): a checkpoint, a run dir or a Hugging Face dir."""
    nonfinite: str = choice("halt", "skip")
    """A step with NaN/Inf loss or gradients: stop with an error, or skip its update (logged in metrics)."""


@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from."""

    source: str = choice("stdlib", "tokens")
    """stdlib: the Python standard library's source files (on every machine); tokens: `moeyard prepare` output."""
    path: str | None = None
    """Directory of prepared token files (source=tokens)."""
    val_fraction: float = 0.05
    """Tail fraction of the token stream held out for eval."""
    max_files: int = 400
    """stdlib: how many source files to read (sorted by path, so the corpus is the same everywhere)."""


@dataclass(kw_only=True)
class LauncherConfig:
    """How processes start; fields of other launchers are ignored."""

    name: str = choice("local", "torchrun", "slurm", "mpi")
    nnodes: int = 1
    """torchrun: nodes (agents)."""
    nproc_per_node: int = 1
    """torchrun/local: processes per node."""
    node_rank: int = 0
    """torchrun: this agent's node; node 0 hosts the c10d rendezvous store at rdzv_endpoint."""
    rdzv_endpoint: str = "127.0.0.1:29500"
    """torchrun: c10d rendezvous host:port."""
    rdzv_id: str = "moeyard"
    """torchrun: the rendezvous (job) id every agent of one job shares."""
    max_restarts: int = 0
    """torchrun: restarts of the whole worker group after a failure."""
    nodes: int = 1
    """slurm: nodes."""
    tasks_per_node: int = 1
    """slurm: tasks (ranks) per node; one per GPU."""
    gpus_per_node: int = 0
    """slurm: GPUs to request per node (0 = none)."""
    partition: str | None = None
    account: str | None = None
    time: str = "00:30:00"
    constraint: str | None = None
    exclusive: bool = False
    setup: list[str] = field(default_factory=list)
    """slurm: lines run before the job (module loads, venv activation)."""
    mode: str = choice("srun", "torchrun")
    """slurm: one task per GPU via srun, or one torchrun per node."""
    dry_run: bool = False
    """slurm: print the sbatch script instead of submitting."""
    wait: bool = False
    """slurm: follow the job and return its exit status."""
    python: str | None = None
    """slurm: the python on the compute nodes (default: the one running `moeyard`, e.g. the venv's)."""
    np: int = 1
    """mpi: ranks."""
    mpirun: str = "mpiexec"
    """mpi: the MPI launcher program (looked up on PATH, then beside the running python)."""
    mpi_args: list[str] = field(default_factory=list)
    """mpi: extra launcher arguments, e.g. [-f, hosts] (MPICH) or [--oversubscribe] (Open MPI)."""
    timeout_s: int = 1800
    """Collective and rendezvous timeout in seconds."""


@dataclass(kw_only=True)
class ProfilingConfig:
    """Throughput/MFU metering, step breakdown, traces and the expert-load tracker."""

    breakdown_every: int = 10
    """Time the step phases every N steps (sampling avoids a host sync per step on GPU); 0 = never."""
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


@dataclass(kw_only=True)
class CheckpointConfig:
    """Distributed checkpoints."""

    enabled: bool = False
    """Write checkpoints: every N steps, at the end, and on SIGTERM (then exit 143)."""
    every: int = 0
    """Save every N steps (0 = only at the end and on SIGTERM); needs enabled=true."""
    keep: int = 2
    """Keep the newest K complete checkpoints (older ones are deleted after a save)."""


@dataclass(kw_only=True)
class RunConfig:
    """The run directory."""

    dir: str | None = None
    """Where config.yaml, metrics and checkpoints go (default runs/<time>-<model>)."""
    name: str | None = None


@dataclass(kw_only=True)
class JobConfig:
    """Everything one training job needs; composed once, then read by every rank."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


ConfigStore.instance().store(name="moeyard_schema", node=JobConfig)


def conf_dir() -> Path:
    """The shipped `conf/` directory (installed as the package `moeyard_conf`)."""
    return Path(str(resources.files("moeyard_conf")))


def compose(overrides: list[str], config_name: str = "config") -> JobConfig:
    """Composes conf/ with command-line overrides into a typed, validated JobConfig."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        raw = hydra_compose(config_name=config_name, overrides=overrides)
    cfg: JobConfig = OmegaConf.to_object(raw)
    if cfg.run.dir is None:
        cfg.run.dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.name}"
    return cfg


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def write_resolved(cfg: JobConfig, run_dir: Path) -> Path:
    """Writes the resolved config atomically; every rank reads this file."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


def load_resolved(path: str | Path) -> JobConfig:
    """Reads a resolved config.yaml back into a typed JobConfig (checked against the schema)."""
    schema = OmegaConf.structured(JobConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(path)))


def as_dict(cfg: JobConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
