"""The job configuration: the launcher schema, composition from `conf/`, the resolved file.

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

from launch.plan.cluster import ClusterConfig
from moe.config import choice
from train.config import TrainerConfig


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
    """torchrun: c10d rendezvous host:port; with nnodes > 1, an address of node 0 that every node reaches."""
    single_host: bool = False
    """torchrun with nnodes > 1: every agent runs on this host (a rehearsal of a multi-node job), so a
    loopback rdzv_endpoint is allowed."""
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
    signal_s: int = 120
    """slurm: Slurm sends SIGTERM this many seconds before the time limit, so the ranks save a checkpoint
    and exit in time (0 = no early signal)."""
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
class JobConfig(TrainerConfig):
    """Everything one training job needs: what each rank reads, plus how the ranks start."""

    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The machines the job runs on: `moeyard plan` and the pre-flight memory check (launch/plan/cluster.py)."""


ConfigStore.instance().store(name="moeyard_schema", node=JobConfig)


def conf_dir() -> Path:
    """The shipped `conf/` directory (installed as the package `moeyard_conf`)."""
    return Path(str(resources.files("moeyard_conf")))


def compose(overrides: list[str], config_name: str = "config") -> JobConfig:
    """Composes conf/ with command-line overrides into a typed, validated JobConfig."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        raw = hydra_compose(config_name=config_name, overrides=overrides)
    cfg: JobConfig = OmegaConf.to_object(raw)
    lc = cfg.launcher
    # Agents on several nodes would each make their own timestamped directory: validation asks for run.dir.
    if cfg.run.dir is None and not (lc.name == "torchrun" and lc.nnodes > 1):
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
