"""Validation of a composed job before any process starts: one line naming the field, the value and the rule."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import socket
from pathlib import Path

from moeyard.interop.hf import check_hf_dir
from moeyard.interop.upcycle import check_dense_dir, dense_model_type
from moeyard.job.layout import check, check_layout
from moeyard.job.schema import ConfigError, JobConfig
from moeyard.moe.experts import HAS_GROUPED_MM
from moeyard.parallel.dims import ParallelDims
from moeyard.plan.planner import preflight as memory_preflight
from moeyard.profiling.trace import check_trace_ranks
from moeyard.train.checkpointing import is_hf_dir, preflight
from moeyard.train.data import load_token_dir


def _check_choices(node: object, prefix: str) -> None:
    """Every key is a schema field and every `choice(...)` field holds one of its listed values."""
    # Hydra's `+key=value` appends keys the structured schema lacks; OmegaConf then sets them as attributes.
    known = [f.name for f in dataclasses.fields(node)]
    for name in vars(node):
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        check(
            name in known,
            f"{prefix}{name}",
            getattr(node, name),
            f"is not a field of {type(node).__name__} (rule: keys must be schema fields{hint})",
        )
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif "choices" in f.metadata:
            check(
                value in f.metadata["choices"],
                f"{prefix}{f.name}",
                value,
                f"must be one of {', '.join(f.metadata['choices'])}",
            )


def validate(cfg: JobConfig, world_size: int) -> ParallelDims:
    """Checks every cross-field rule for `world_size` ranks; returns the parallel degrees."""
    _check_choices(cfg, "")
    m, e, t, p, o = cfg.model, cfg.moe, cfg.train, cfg.parallel, cfg.optim
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "vocab_size", "max_seq_len"):
        check(getattr(m, name) >= 1, f"model.{name}", getattr(m, name), "must be >= 1")
    check(
        m.dim % m.n_heads == 0 or m.head_dim_override is not None or m.attention == "mla",
        "model.dim",
        m.dim,
        f"must be divisible by model.n_heads={m.n_heads} (or set model.head_dim_override)",
    )
    try:
        m.check_attention()
        cfg.moe.check_shared()
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_kv_heads",
        m.n_kv_heads,
        f"must divide model.n_heads={m.n_heads}",
    )
    check(m.moe_every >= 1, "model.moe_every", m.moe_every, "must be >= 1")
    check(e.num_experts >= 1, "moe.num_experts", e.num_experts, "must be >= 1")
    check(
        1 <= e.top_k <= e.num_experts,
        "moe.top_k",
        e.top_k,
        f"must be in [1, moe.num_experts={e.num_experts}]",
    )
    check(e.expert_hidden >= 1, "moe.expert_hidden", e.expert_hidden, "must be >= 1")
    check(e.num_shared_experts >= 0, "moe.num_shared_experts", e.num_shared_experts, "must be >= 0")
    cf = e.capacity_factor
    check(cf is None or cf > 0, "moe.capacity_factor", cf, "must be > 0, or null for dropless")
    check(
        e.n_groups >= 1 and e.num_experts % e.n_groups == 0,
        "moe.n_groups",
        e.n_groups,
        f"must divide moe.num_experts={e.num_experts}",
    )
    check(
        1 <= e.topk_groups <= e.n_groups,
        "moe.topk_groups",
        e.topk_groups,
        f"must be in [1, moe.n_groups={e.n_groups}]",
    )
    if e.n_groups > 1:
        reachable = e.topk_groups * (e.num_experts // e.n_groups)
        check(
            e.top_k <= reachable,
            "moe.top_k",
            e.top_k,
            f"must be <= experts in the chosen groups ({reachable})",
        )
    for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        check(getattr(e, name) >= 0, f"moe.{name}", getattr(e, name), "must be >= 0")
    if e.grouped_mm == "on":
        check(HAS_GROUPED_MM, "moe.grouped_mm", "on", "needs a torch with grouped_mm (use auto or off)")
        check(
            m.dim % 8 == 0 and e.expert_hidden % 8 == 0,
            "moe.grouped_mm",
            "on",
            f"needs model.dim={m.dim} and moe.expert_hidden={e.expert_hidden} divisible by 8 (16-byte rows)",
        )
    check(t.steps >= 1, "train.steps", t.steps, "must be >= 1")
    check(t.seq_len >= 2, "train.seq_len", t.seq_len, "must be >= 2")
    check(
        t.seq_len <= m.max_seq_len,
        "train.seq_len",
        t.seq_len,
        f"must be <= model.max_seq_len={m.max_seq_len}",
    )
    check(t.micro_batches >= 1, "train.micro_batches", t.micro_batches, "must be >= 1")
    check(
        t.batch_size % t.micro_batches == 0,
        "train.batch_size",
        t.batch_size,
        f"must be divisible by train.micro_batches={t.micro_batches}",
    )
    check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "must be >= 0")
    check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 = off)")
    check(0 < cfg.data.val_fraction < 1, "data.val_fraction", cfg.data.val_fraction, "must be in (0, 1)")
    check(
        cfg.data.source != "tokens" or bool(cfg.data.path),
        "data.path",
        cfg.data.path,
        "must name a `moeyard prepare` directory when data.source=tokens",
    )
    if cfg.data.source == "tokens":
        _check_token_dir(cfg.data.path, m.vocab_size)
    _check_launcher(cfg)
    try:
        dims = ParallelDims.from_config(p, world_size)
    except ValueError as err:
        raise ConfigError(f"{err} ({cfg.launcher.request()})") from None
    check_layout(cfg, dims)
    try:
        check_trace_ranks(cfg.profiling, world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _check_checkpointing(cfg)
    _check_memory(cfg, world_size)
    return dims


def _check_memory(cfg: JobConfig, world_size: int) -> None:
    """The pre-flight: the layout's predicted peak memory per rank against the device's (launch/plan/planner.py)."""
    try:
        error = memory_preflight(cfg, world_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if error:
        raise ConfigError(error)


def _check_launcher(cfg: JobConfig) -> None:
    """Launcher fields, and whether the nodes x ranks request can hold the layout."""
    lc, tp = cfg.launcher, cfg.parallel.tp
    check(lc.timeout_s >= 1, "launcher.timeout_s", lc.timeout_s, "must be >= 1")
    if lc.name == "mpi":
        check(lc.np >= 1, "launcher.np", lc.np, "must be >= 1")
        return
    per_node = lc.tasks_per_node if lc.name == "slurm" else lc.nproc_per_node
    nodes = {"slurm": lc.nodes, "torchrun": lc.nnodes}.get(lc.name, 1)
    per_node_field = "launcher.tasks_per_node" if lc.name == "slurm" else "launcher.nproc_per_node"
    check(per_node >= 1, per_node_field, per_node, "must be >= 1")
    check(nodes >= 1, "launcher.nodes" if lc.name == "slurm" else "launcher.nnodes", nodes, "must be >= 1")
    if nodes > 1:
        check(
            per_node % tp == 0,
            "parallel.tp",
            tp,
            f"must divide {per_node_field}={per_node} (a tensor-parallel group stays inside one node)",
        )
    if lc.name == "torchrun":
        check(0 <= lc.node_rank < lc.nnodes, "launcher.node_rank", lc.node_rank, f"must be in [0, {lc.nnodes})")
        check(lc.max_restarts >= 0, "launcher.max_restarts", lc.max_restarts, "must be >= 0")
        host, _, port = lc.rdzv_endpoint.rpartition(":")
        check(bool(host) and port.isdigit(), "launcher.rdzv_endpoint", lc.rdzv_endpoint, "must be host:port")
        if lc.nnodes > 1:
            _check_multinode_torchrun(cfg, host)
    if lc.name == "slurm":
        check(lc.gpus_per_node >= 0, "launcher.gpus_per_node", lc.gpus_per_node, "must be >= 0")
        check(
            lc.gpus_per_node == 0 or lc.tasks_per_node <= lc.gpus_per_node,
            "launcher.tasks_per_node",
            lc.tasks_per_node,
            f"must be <= launcher.gpus_per_node={lc.gpus_per_node} (one GPU per rank)",
        )


def _check_multinode_torchrun(cfg: JobConfig, host: str) -> None:
    """Agents on several nodes must meet at an address they all reach and write into one shared run.dir."""
    lc = cfg.launcher
    check(
        cfg.run.dir is not None,
        "run.dir",
        None,
        f"must be given for launcher.nnodes={lc.nnodes} (rule: every node writes into one directory on a "
        "shared filesystem; a default would differ per node)",
    )
    if not lc.single_host and _is_loopback(host):
        raise ConfigError(
            f"launcher.rdzv_endpoint={lc.rdzv_endpoint} is a loopback address, which other nodes cannot reach "
            f"(rule: with launcher.nnodes={lc.nnodes} give node 0's address; launcher.single_host=true if "
            "every agent runs on this host)"
        )


def _is_loopback(host: str) -> bool:
    """Whether `host` is or resolves to a loopback address (a name that does not resolve here is not)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None)
    except OSError:
        return False
    return any(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def _check_token_dir(path: str, vocab_size: int) -> None:
    """The prepared token files exist, are complete and fit the vocabulary: found before any rank starts."""
    try:
        load_token_dir(path, vocab_size)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_checkpointing(cfg: JobConfig) -> None:
    """checkpoint.* values, and that train.resume / train.init_from name loadable, compatible checkpoints."""
    c, t = cfg.checkpoint, cfg.train
    check(c.every >= 0, "checkpoint.every", c.every, "must be >= 0 (0 = only at the end and on SIGTERM)")
    check(c.keep >= 1, "checkpoint.keep", c.keep, "must be >= 1")
    check(c.every == 0 or c.enabled, "checkpoint.every", c.every, "needs checkpoint.enabled=true")
    check(bool(t.resume), "train.resume", t.resume, "must be none, auto or a checkpoint path")
    _check_upcycle(cfg)
    try:
        preflight(t.resume, None if t.upcycle else t.init_from, cfg.run.dir, cfg.model, cfg.moe)
        if t.init_from and not t.upcycle and is_hf_dir(t.init_from):
            check_hf_dir(Path(t.init_from), cfg.model, cfg.moe, "train.init_from")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_upcycle(cfg: JobConfig) -> None:
    """train.upcycle: a dense Hugging Face directory, and an MoE whose step-0 function is the dense model's."""
    t, e = cfg.train, cfg.moe
    g = t.upcycle_granularity
    check(g >= 1, "train.upcycle_granularity", g, "must be >= 1")
    if not t.upcycle:
        check(g == 1, "train.upcycle_granularity", g, "needs train.upcycle=true")
        family = dense_model_type(t.init_from) if t.init_from else None
        why = f"must be true for train.init_from={t.init_from}, dense model_type={family} weights"
        check(family is None, "train.upcycle", False, f"{why} (rule: a dense model is upcycled into the MoE)")
        return
    check(bool(t.init_from), "train.upcycle", True, "needs train.init_from=a dense Hugging Face Llama/Qwen3 dir")
    check(is_hf_dir(t.init_from), "train.init_from", t.init_from, "must be a Hugging Face dir with train.upcycle")
    rule = "(each copy of the dense FFN is g experts)"
    check(
        e.num_experts % g == 0,
        "moe.num_experts",
        e.num_experts,
        f"must be divisible by train.upcycle_granularity={g} {rule}",
    )
    check(
        e.num_shared_experts == 0, "moe.num_shared_experts", e.num_shared_experts, "must be 0 with train.upcycle=true"
    )
    if g > 1:
        whole = f"with train.upcycle_granularity={g} (tied router rows pick whole copies of the g slices)"
        check(e.router != "expert_choice", "moe.router", e.router, f"must be token-choice {whole}")
        check(e.top_k % g == 0, "moe.top_k", e.top_k, f"must be a multiple of {g} {whole}")
        group = e.num_experts // e.n_groups
        check(group % g == 0, "moe.n_groups", e.n_groups, f"must leave a multiple of {g} experts per group {whole}")
        check(
            e.route_scale == g,
            "moe.route_scale",
            e.route_scale,
            f"must be {g} {whole}: each slice's weights sum to 1/g",
        )
    try:
        check_dense_dir(Path(t.init_from), cfg.model, e, g, "train.init_from")
    except ValueError as err:
        raise ConfigError(str(err)) from None
