"""The layout rules: whether a parallel layout fits a model and a batch, shared by validation and the planner."""

from __future__ import annotations

from moeyard.job.schema import JobConfig
from moeyard.moe.config import require
from moeyard.parallel.dims import ParallelDims


def check_layout(cfg: JobConfig, dims: ParallelDims) -> None:
    """The rules a parallel layout must meet for this model and batch; raises ValueError "field=value rule"
    (validation shows it as a ConfigError, the planner passes the layout over)."""
    m, e, t, p = cfg.model, cfg.moe, cfg.train, cfg.parallel
    p.check()
    require(e.num_experts % dims.ep == 0, "parallel.ep", dims.ep, f"must divide moe.num_experts={e.num_experts}")
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
    require(
        p.ep_overlap == "none" or dims.ep > 1,
        "parallel.ep_overlap",
        p.ep_overlap,
        "needs parallel.ep > 1 (without expert parallelism there is no all-to-all to hide)",
    )
