"""The job schema: one `moeyard train` job as typed dataclasses, also the Hydra structured-config schema.

`TrainerConfig` (train/config.py) is what every rank reads; `JobConfig` adds how the ranks start
(`LauncherConfig`) and the machines the planner and the pre-flight reason about (`ClusterConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeyard.moe.config import choice
from moeyard.train.config import TrainerConfig


class ConfigError(ValueError):
    """A user-facing configuration error; its message is the single line shown."""


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
    rdzv_endpoint: str | None = None
    """torchrun: c10d rendezvous host:port; with nnodes > 1, an address of node 0 that every node reaches.
    Unset (one node only): torchrun's standalone mode picks a free local port, so jobs run side by side."""
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
    """Print what would start the job (slurm: the sbatch script; others: the command line) and start nothing."""
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

    def fields_used(self) -> frozenset[str]:
        """The fields this launcher reads (the others are ignored), so checks apply where they matter."""
        common = {"name", "dry_run", "timeout_s"}
        rendezvous = {"nnodes", "node_rank", "rdzv_endpoint", "single_host", "rdzv_id", "max_restarts"}
        slurm = {"nodes", "tasks_per_node", "gpus_per_node", "partition", "account", "time", "constraint"}
        slurm |= {"exclusive", "signal_s", "setup", "mode", "wait", "python", "max_restarts"}
        own = {
            "local": {"nproc_per_node"},
            "torchrun": {"nproc_per_node", *rendezvous},
            "slurm": slurm,
            "mpi": {"np", "mpirun", "mpi_args"},
        }[self.name]
        return frozenset(common | own)

    def in_process(self) -> bool:
        """The job's one rank runs inside the `moeyard` process (launcher=local with one process)."""
        return self.name == "local" and self.nproc_per_node == 1

    def standalone(self) -> bool:
        """One node and no rendezvous endpoint given: torchrun's standalone mode picks a free local port."""
        return self.name == "local" or (self.nnodes == 1 and self.rdzv_endpoint is None)

    def rendezvous(self) -> str:
        """Where the torchrun agents meet, for messages."""
        return "a free local port (torchrun --standalone)" if self.standalone() else str(self.rdzv_endpoint)

    def runs_on_each_node(self) -> bool:
        """The user starts `moeyard train` on every node (multi-node torchrun): each composes its own config."""
        return self.name == "torchrun" and self.nnodes > 1

    def rank_env_source(self) -> str:
        """What tells a rank its rank and world size: "srun" (Slurm tasks), "mpi" (mpi4py), or "torchrun"
        (which sets the torch.distributed variables itself)."""
        if self.name == "slurm" and self.mode == "srun":
            return "srun"
        return "mpi" if self.name == "mpi" else "torchrun"

    def world_size(self) -> int:
        """How many ranks this launcher starts."""
        return self.nodes_requested() * self.ranks_per_node()

    def nodes_requested(self) -> int:
        """Nodes the job spans (1 for local and MPI, whose hosts are the MPI launcher's business)."""
        return {"torchrun": self.nnodes, "slurm": self.nodes}.get(self.name, 1)

    def ranks_per_node(self) -> int:
        """Ranks on each node (MPI: all of them, as one group of hosts)."""
        return {"slurm": self.tasks_per_node, "mpi": self.np}.get(self.name, self.nproc_per_node)

    def per_node_field(self) -> str:
        """The field that sets `ranks_per_node`, for error messages."""
        return {"slurm": "launcher.tasks_per_node", "mpi": "launcher.np"}.get(self.name, "launcher.nproc_per_node")

    def nodes_field(self) -> str:
        """The field that sets `nodes_requested`, for error messages."""
        return "launcher.nodes" if self.name == "slurm" else "launcher.nnodes"

    def request(self) -> str:
        """Where the world size comes from, for error messages."""
        if self.name == "mpi":
            return f"launcher.np={self.np}"
        if self.name in ("torchrun", "slurm"):
            return f"{self.nodes_field()}={self.nodes_requested()} x {self.per_node_field()}={self.ranks_per_node()}"
        return f"launcher.nproc_per_node={self.nproc_per_node}"


@dataclass(kw_only=True)
class ClusterConfig:
    """Where the job will run, for `moeyard plan` and the pre-flight memory check of `moeyard train`."""

    gpu: str = choice("auto", "h100", "h200", "h800", "a100", "cpu")
    """Device kind; auto: this machine's GPU (by name), or cpu for a job with train.device=cpu; `moeyard plan`
    refuses auto on a machine without a GPU for a job that does not say cpu (cpu plans CPU ranks)."""
    nodes: int | None = None
    """`moeyard plan`: nodes to plan for; null = the launcher's (`moeyard train` takes the world from it)."""
    gpus_per_node: int | None = None
    """`moeyard plan`: ranks per node; null = the launcher's ranks per node."""
    memory_gb: float | None = None
    """Usable device memory per rank in GB (1e9 B), overriding the table (e.g. a MIG slice)."""
    memory_margin: float = 0.10
    """`moeyard plan` recommends only layouts predicted to leave this share of usable memory free."""
    moe_headroom: float = 1.2
    """Routed rows a rank may receive under expert parallelism, over the balanced share (stated imbalance)."""
    preflight: bool = True
    """`moeyard train` stops before spawning when the layout is predicted not to fit; false lets it proceed."""
    calibration: str | None = None
    """A JSON file of measured efficiencies: benchmarks/gpu_check.py --out, or benchmarks/plan_cpu.py output."""


@dataclass(kw_only=True)
class JobConfig(TrainerConfig):
    """Everything one training job needs: what each rank reads, plus how the ranks start."""

    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """The machines the job runs on: `moeyard plan` and the pre-flight memory check (plan/cluster.py)."""
