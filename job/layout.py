"""The layout rules: whether a parallel layout fits a model and a batch, shared by validation and the planner."""

from __future__ import annotations

from moeyard.job.schema import JobConfig
from moeyard.moe.config import require
from moeyard.parallel.config import shards_optimizer
from moeyard.parallel.dims import ParallelDims


def check_context(cfg: JobConfig, dims: ParallelDims) -> None:
    """Context parallelism's rules (parallel/context.py): rows cut into 2 cp equal chunks, each rank's tp
    slices equal, and refusals of what it does not support yet."""
    m, e, t, p = cfg.model, cfg.moe, cfg.train, cfg.parallel
    cp = f"parallel.cp={dims.cp}"
    require(
        t.seq_len % (2 * dims.cp) == 0, "train.seq_len", t.seq_len, f"must be divisible by 2 x {cp} (two chunks a rank)"
    )
    require(
        (t.seq_len // dims.cp) % dims.tp == 0,
        "train.seq_len",
        t.seq_len,
        f"must be divisible by {cp} x parallel.tp={dims.tp} (tp ranks split each cp rank's positions)",
    )
    # Each of these needs a row's tokens in their order on one rank, or a whole row's statistic.
    require(m.sliding_window == 0, "model.sliding_window", m.sliding_window, f"is not supported with {cp}")
    require(m.mtp_layers == 0, "model.mtp_layers", m.mtp_layers, f"is not supported with {cp}")
    require(e.router != "expert_choice", "moe.router", e.router, f"is not supported with {cp}")
    require(e.capacity_factor is None, "moe.capacity_factor", e.capacity_factor, f"must be null (dropless) with {cp}")
    require(e.dispatch != "static", "moe.dispatch", e.dispatch, f"is not supported with {cp}")
    require(not p.compile, "parallel.compile", p.compile, f"is not supported with {cp}")


def check_layout(cfg: JobConfig, dims: ParallelDims) -> None:
    """The rules a parallel layout must meet for this model and batch; raises ValueError "field=value rule"
    (validation shows it as a ConfigError, the planner passes the layout over)."""
    m, e, t, p = cfg.model, cfg.moe, cfg.train, cfg.parallel
    p.check()
    if dims.cp > 1:
        check_context(cfg, dims)
    require(e.num_experts % dims.ep == 0, "parallel.ep", dims.ep, f"must divide moe.num_experts={e.num_experts}")
    if cfg.optim.name == "muon":  # parallel/zero.py's AdamW steps fp32 master slices, not the parameters
        zero = shards_optimizer(p.dp_mode, p.param_dtype)
        rule = (
            f"does not run with parallel.dp_mode={p.dp_mode} and parallel.param_dtype={p.param_dtype} (rule: Muon"
            " steps the parameters themselves; zero1's and bf16 parameters' fp32 masters take parallel/zero.py's AdamW)"
        )
        require(not zero, "optim.name", "muon", rule)
    require(m.n_heads % dims.tp == 0, "parallel.tp", dims.tp, f"must divide model.n_heads={m.n_heads}")
    require(m.n_kv_heads % dims.tp == 0, "parallel.tp", dims.tp, f"must divide model.n_kv_heads={m.n_kv_heads}")
    require(m.vocab_size % dims.tp == 0, "parallel.tp", dims.tp, f"must divide model.vocab_size={m.vocab_size}")
    require(m.ffn_hidden % dims.tp == 0, "parallel.tp", dims.tp, f"must divide model.ffn_hidden={m.ffn_hidden}")
    has_moe = m.n_layers > m.first_dense_layers
    if p.sequence_parallel or (dims.tp > 1 and has_moe):
        why = "sequence parallelism splits it" if p.sequence_parallel else "tp ranks split MoE layers by sequence"
        require(
            t.seq_len % dims.tp == 0,
            "train.seq_len",
            t.seq_len,
            f"must be divisible by parallel.tp={dims.tp} ({why})",
        )
    per_micro = t.batch_size // t.micro_batches
    require(
        per_micro % dims.dp == 0,
        "train.batch_size/micro_batches",
        per_micro,
        f"must be divisible by the data-parallel degree dp={dims.dp}",
    )
    stages = dims.pp * p.pp_stages_per_rank
    require(
        m.n_layers >= stages,
        "model.n_layers",
        m.n_layers,
        f"is too few for {stages} pipeline stages (pp={dims.pp} x pp_stages_per_rank={p.pp_stages_per_rank})",
    )
    if p.pp_layers:
        require(
            len(p.pp_layers) == stages and all(n >= 1 for n in p.pp_layers) and sum(p.pp_layers) == m.n_layers,
            "parallel.pp_layers",
            p.pp_layers,
            f"must give {stages} positive counts summing to {m.n_layers}",
        )
    if p.pp_schedule == "interleaved_1f1b" and dims.pp > 1:
        require(
            p.pp_stages_per_rank >= 2,
            "parallel.pp_stages_per_rank",
            p.pp_stages_per_rank,
            "must be >= 2 for pp_schedule=interleaved_1f1b",
        )
        require(
            t.micro_batches % dims.pp == 0,
            "train.micro_batches",
            t.micro_batches,
            f"must be a multiple of parallel.pp={dims.pp} for interleaved_1f1b",
        )
    if p.pp_schedule != "interleaved_1f1b":
        require(
            p.pp_stages_per_rank == 1,
            "parallel.pp_stages_per_rank",
            p.pp_stages_per_rank,
            f"must be 1 for pp_schedule={p.pp_schedule} (only interleaved_1f1b has virtual stages)",
        )
    if dims.pp > 1:
        require(
            t.micro_batches >= dims.pp,
            "train.micro_batches",
            t.micro_batches,
            f"must be >= parallel.pp={dims.pp} so every stage has work in the schedule",
        )
        require(not m.tie_embeddings, "model.tie_embeddings", True, "is not supported with parallel.pp > 1")
    if dims.tp > 1:
        require(not m.tie_embeddings, "model.tie_embeddings", True, "is not supported with parallel.tp > 1")
    if m.mtp_layers:  # its norms and projection are plain replicated modules, fed the whole sequence
        require(
            not p.sequence_parallel,
            "model.mtp_layers",
            m.mtp_layers,
            "is not supported with parallel.sequence_parallel",
        )
        require(m.mtp_layers < t.seq_len, "model.mtp_layers", m.mtp_layers, f"must be < train.seq_len={t.seq_len}")
    _check_zero(cfg)
    require(
        p.ep_overlap == "none" or dims.ep > 1,
        "parallel.ep_overlap",
        p.ep_overlap,
        "needs parallel.ep > 1 (without expert parallelism there is no all-to-all to hide)",
    )
    require(
        p.ep_overlap == "none" or e.dispatch == "dynamic",
        "parallel.ep_overlap",
        p.ep_overlap,
        "needs moe.dispatch=dynamic (the static all-to-alls always run the shared experts while they travel)",
    )
    require(
        not (p.compile and e.balance_scope == "global_batch"),
        "moe.balance_scope",
        e.balance_scope,
        "is not supported with parallel.compile=true (its per-step counts live outside the compiled graph)",
    )


def _check_zero(cfg: JobConfig) -> None:
    """parallel.param_dtype=bf16 (parallel/zero.py's fp32 masters): the combinations it does not support (optim=muon
    is refused above)."""
    p = cfg.parallel
    if p.param_dtype == "bf16":
        require(
            cfg.train.dtype == "bf16",
            "parallel.param_dtype",
            p.param_dtype,
            f"needs train.dtype=bf16, not {cfg.train.dtype} (the model computes in its parameters' dtype)",
        )
        require(
            p.dp_mode not in ("fsdp", "zero2"),
            "parallel.param_dtype",
            p.param_dtype,
            f"is for dp_mode=replicate or zero1, not {p.dp_mode} (FSDP2 keeps fp32 shards as the masters and "
            "gathers bf16 parameters under train.dtype=bf16 already)",
        )
