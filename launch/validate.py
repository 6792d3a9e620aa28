"""Validation of a composed job before any process starts: one line naming the field, the value and the rule.

Each config group checks its own fields (`ModelConfig.check()`, `MoEConfig.check()`, ...; they raise ValueError,
sitting below the job schema). `validate` calls each once, in the order of the config, then checks the rules
that join groups: the data against the model, the layout against the world size, the checkpoints and weights
named against the model, and the predicted memory against the device.
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import socket
from pathlib import Path

from moeyard.interop.hf import check_hf_dir
from moeyard.interop.upcycle import check_dense_dir, dense_model_type
from moeyard.job.layout import check_layout
from moeyard.job.schema import ConfigError, JobConfig
from moeyard.moe.config import check_fields, require
from moeyard.moe.experts import HAS_GROUPED_MM
from moeyard.parallel.dims import ParallelDims
from moeyard.plan.cluster import check_cluster
from moeyard.plan.planner import preflight as memory_preflight
from moeyard.train.checkpointing import is_hf_dir, preflight
from moeyard.train.data import check_vocab


def validate(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Checks every group's fields and every cross-group rule for `world_size` ranks; returns the degrees.

    Raises ConfigError (one line) for the first rule broken."""
    try:
        return _validate(cfg, world_size)
    except ConfigError:
        raise
    except ValueError as err:  # a group's own check, or a file found wrong: the same one line
        raise ConfigError(str(err)) from None


def _validate(cfg: JobConfig, world_size: int) -> ParallelDims:
    check_fields(cfg, "")
    for group in ("launcher", "cluster", "run"):  # schemas whose rules are checked with other groups below
        check_fields(getattr(cfg, group), f"{group}.")
    cfg.model.check()
    cfg.moe.check()
    cfg.optim.check()
    cfg.train.check()
    cfg.data.check()
    cfg.parallel.check()
    cfg.profiling.check(world_size)
    _check_sink_packages(cfg)
    cfg.checkpoint.check()
    check_cluster(cfg.cluster)
    _check_model_fits(cfg)
    check_vocab(cfg.data, cfg.model.vocab_size, cfg.train.seq_len)
    _check_launcher(cfg)
    try:
        dims = ParallelDims.from_config(cfg.parallel, world_size)
    except ValueError as err:
        raise ConfigError(f"{err} ({cfg.launcher.request()})") from None
    check_layout(cfg, dims)
    _check_checkpointing(cfg)
    _check_memory(cfg, world_size)
    return dims


def _check_model_fits(cfg: JobConfig) -> None:
    """The rules joining the model, its MoE layers, the batch and this torch."""
    m, e, t = cfg.model, cfg.moe, cfg.train
    require(t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len, f"must be <= model.max_seq_len={m.max_seq_len}")
    no_cpu_flex = "needs a GPU: torch has no FlexAttention backward on CPU (train.device=cpu; use auto or sdpa)"
    require(m.attn_impl != "flex" or t.device != "cpu", "model.attn_impl", m.attn_impl, no_cpu_flex)
    if e.grouped_mm == "on":
        require(HAS_GROUPED_MM, "moe.grouped_mm", "on", "needs a torch with grouped_mm (use auto or off)")
        require(
            m.dim % 8 == 0 and e.expert_hidden % 8 == 0,
            "moe.grouped_mm",
            "on",
            f"needs model.dim={m.dim} and moe.expert_hidden={e.expert_hidden} divisible by 8 (16-byte rows)",
        )


def _check_sink_packages(cfg: JobConfig) -> None:
    """The optional packages the metric sinks asked for are installed (rank 0 imports them only when it starts)."""
    p = cfg.profiling
    asked = {
        "profiling.tensorboard": (p.tensorboard, {"tensorboard": "tensorboard"}, "pip install tensorboard"),
        "profiling.wandb": (p.wandb, {"wandb": "wandb", "PIL": "pillow"}, "pip install 'moeyard[wandb]'"),
    }
    for name, (on, modules, install) in asked.items():  # module -> the package that installs it
        missing = [pkg for module, pkg in modules.items() if on and importlib.util.find_spec(module) is None]
        require(not missing, name, "true", f"needs {' and '.join(missing)} installed ({install})")


def _check_memory(cfg: JobConfig, world_size: int) -> None:
    """The pre-flight: the layout's predicted peak memory per rank against the device's (plan/planner.py)."""
    error = memory_preflight(cfg, world_size)
    if error:
        raise ConfigError(error)


def _check_launcher(cfg: JobConfig) -> None:
    """Launcher fields, and whether the nodes x ranks request can hold the layout."""
    lc, tp, used = cfg.launcher, cfg.parallel.tp, cfg.launcher.fields_used()
    require(lc.timeout_s >= 1, "launcher.timeout_s", lc.timeout_s, "must be >= 1")
    per_node, nodes = lc.ranks_per_node(), lc.nodes_requested()
    require(per_node >= 1, lc.per_node_field(), per_node, "must be >= 1")
    require(nodes >= 1, lc.nodes_field(), nodes, "must be >= 1")
    if nodes > 1:
        require(
            per_node % tp == 0,
            "parallel.tp",
            tp,
            f"must divide {lc.per_node_field()}={per_node} (a tensor-parallel group stays inside one node)",
        )
    if "node_rank" in used:
        require(0 <= lc.node_rank < lc.nnodes, "launcher.node_rank", lc.node_rank, f"must be in [0, {lc.nnodes})")
    if "max_restarts" in used:
        require(lc.max_restarts >= 0, "launcher.max_restarts", lc.max_restarts, "must be >= 0")
    if "rdzv_endpoint" in used:
        _check_rdzv_endpoint(cfg)
    if "gpus_per_node" in used:
        require(lc.gpus_per_node >= 0, "launcher.gpus_per_node", lc.gpus_per_node, "must be >= 0")
        require(
            lc.gpus_per_node == 0 or lc.tasks_per_node <= lc.gpus_per_node,
            "launcher.tasks_per_node",
            lc.tasks_per_node,
            f"must be <= launcher.gpus_per_node={lc.gpus_per_node} (one GPU per rank)",
        )


def _check_rdzv_endpoint(cfg: JobConfig) -> None:
    """Unset on one node (a free port is picked); host:port otherwise, reachable by every node, and free here
    when this agent hosts the rendezvous store (node 0)."""
    lc = cfg.launcher
    if lc.nnodes > 1:
        _check_multinode_run_dir(cfg)
    if lc.rdzv_endpoint is None:
        require(
            lc.nnodes == 1,
            "launcher.rdzv_endpoint",
            None,
            f"must be given for launcher.nnodes={lc.nnodes} (rule: every node's agent meets at node 0's host:port)",
        )
        return
    host, _, port = lc.rdzv_endpoint.rpartition(":")
    require(bool(host) and port.isdigit(), "launcher.rdzv_endpoint", lc.rdzv_endpoint, "must be host:port")
    if lc.nnodes > 1 and not lc.single_host and _is_loopback(host):
        raise ConfigError(
            f"launcher.rdzv_endpoint={lc.rdzv_endpoint} is a loopback address, which other nodes cannot reach "
            f"(rule: with launcher.nnodes={lc.nnodes} give node 0's address; launcher.single_host=true if "
            "every agent runs on this host)"
        )
    if lc.node_rank == 0 and _port_in_use(host.strip("[]"), int(port)):
        raise ConfigError(
            f"launcher.rdzv_endpoint={lc.rdzv_endpoint}: port {port} is already in use on this host (rule: node 0 "
            "hosts the rendezvous there; pick a free port, or leave launcher.rdzv_endpoint unset on one node)"
        )


def _check_multinode_run_dir(cfg: JobConfig) -> None:
    """Agents on several nodes must write into one shared run.dir."""
    require(
        cfg.run.dir is not None,
        "run.dir",
        None,
        f"must be given for launcher.nnodes={cfg.launcher.nnodes} (rule: every node writes into one directory on "
        "a shared filesystem; a default would differ per node)",
    )


def _port_in_use(host: str, port: int) -> bool:
    """Whether something listens on `port` at `host`, an address of this machine; False for an address that
    is not this machine's (another node hosts the store) or does not resolve here."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # SO_REUSEADDR, as the rendezvous store sets it: a port a finished job left in TIME_WAIT is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            return err.errno == errno.EADDRINUSE
    return False


def _is_loopback(host: str) -> bool:
    """Whether `host` is or resolves to a loopback address (a name that does not resolve here is not)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except OSError:
        return False
    return any(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _check_checkpointing(cfg: JobConfig) -> None:
    """train.resume and train.init_from name loadable checkpoints or weights that fit this model."""
    t = cfg.train
    _check_upcycle(cfg)
    preflight(t.resume, None if t.upcycle else t.init_from, cfg.run.dir, cfg.model, cfg.moe)
    if t.init_from and not t.upcycle and is_hf_dir(t.init_from):
        check_hf_dir(Path(t.init_from), cfg.model, cfg.moe, "train.init_from")


def _check_upcycle(cfg: JobConfig) -> None:
    """train.upcycle: a dense Hugging Face directory, and an MoE whose step-0 function is the dense model's."""
    t, e = cfg.train, cfg.moe
    g = t.upcycle_granularity
    if not t.upcycle:
        family = dense_model_type(t.init_from) if t.init_from else None
        why = f"must be true for train.init_from={t.init_from}, dense model_type={family} weights"
        require(family is None, "train.upcycle", False, f"{why} (rule: a dense model is upcycled into the MoE)")
        return
    require(is_hf_dir(t.init_from), "train.init_from", t.init_from, "must be a Hugging Face dir with train.upcycle")
    rule = "(each copy of the dense FFN is g experts)"
    require(
        e.num_experts % g == 0,
        "moe.num_experts",
        e.num_experts,
        f"must be divisible by train.upcycle_granularity={g} {rule}",
    )
    require(
        e.num_shared_experts == 0, "moe.num_shared_experts", e.num_shared_experts, "must be 0 with train.upcycle=true"
    )
    if g > 1:
        whole = f"with train.upcycle_granularity={g} (tied router rows pick whole copies of the g slices)"
        require(e.router != "expert_choice", "moe.router", e.router, f"must be token-choice {whole}")
        require(e.top_k % g == 0, "moe.top_k", e.top_k, f"must be a multiple of {g} {whole}")
        group = e.num_experts // e.n_groups
        require(group % g == 0, "moe.n_groups", e.n_groups, f"must leave a multiple of {g} experts per group {whole}")
        require(
            e.route_scale == g,
            "moe.route_scale",
            e.route_scale,
            f"must be {g} {whole}: each slice's weights sum to 1/g",
        )
    check_dense_dir(Path(t.init_from), cfg.model, e, g, "train.init_from")
