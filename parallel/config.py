"""Parallel layout configuration: `ParallelConfig`, the Hydra schema of the `parallel` group, and its own checks.

The rules that need the model or the world size (degrees dividing heads, experts, the batch) are in
`moeyard.job.layout` and `ParallelDims`; docs/parallel.md describes every layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeyard.moe.config import check_fields, choice, require

FSDP_MODES = ("zero2", "fsdp")
"""dp_mode values applied with FSDP2 (parameters sharded at rest, gradients reduce-scattered)."""


def uses_fsdp(dp_mode: str, dp: int) -> bool:
    """Whether `dp_mode` applies FSDP2 at data-parallel degree `dp` (with one dp rank it has nothing to shard)."""
    return dp_mode in FSDP_MODES and dp > 1


def shards_optimizer(dp_mode: str, param_dtype: str) -> bool:
    """Whether parallel/zero.py's optimizer steps the model (zero1, or fp32 masters of bf16 parameters)."""
    return dp_mode == "zero1" or (param_dtype == "bf16" and dp_mode not in FSDP_MODES)


@dataclass(kw_only=True)
class ParallelConfig:
    """Degrees of each parallelism and how they are applied.

    World size = pp * dp * cp * tp. Expert parallelism folds over the data-, context- and tensor-parallel ranks
    of a pipeline stage: its dp * cp * tp ranks are regrouped into edp * ep, the ep consecutive ranks of a
    group split each MoE layer's experts (tp ranks first, then cp, then neighbouring dp ranks), and the
    edp = dp * cp * tp / ep groups hold replicas of the same experts.
    """

    dp: int = -1
    """Data-parallel degree; -1 infers world_size / (pp * tp)."""
    tp: int = 1
    """Tensor-parallel degree (attention heads, dense FFN, vocabulary)."""
    pp: int = 1
    """Pipeline-parallel degree (stages over ranks)."""
    ep: int = 1
    """Expert-parallel degree; divides dp * cp * tp and moe.num_experts."""
    cp: int = 1
    """Context-parallel degree: each sequence is split over cp ranks (two chunks each, one from either end, so
    causal work is balanced) and attention all-gathers keys and values over them (parallel/context.py)."""
    dp_mode: str = choice("replicate", "zero1", "zero2", "fsdp")
    """replicate: parameters, gradients and AdamW state on every dp rank, gradients all-reduced; zero1:
    parameters and gradients replicated, AdamW state (and bf16 runs' fp32 master weights) sharded over dp,
    updated parameters all-gathered (parallel/zero.py); zero2: gradients reduce-scattered too (FSDP2 without
    resharding after forward: parameters gathered once a step, docs/zero.md); fsdp: parameters sharded too,
    gathered per block in forward and again in backward (FSDP2)."""
    param_dtype: str = choice("fp32", "bf16")
    """dp_mode=replicate|zero1 with train.dtype=bf16: the model's parameters and gradients in bf16 (2 + 2 B per
    element), the fp32 master weights kept by the optimizer beside AdamW's moments, as Megatron-Core keeps
    them (fsdp and zero2 already keep fp32 shards as masters and gather bf16 ones)."""
    fsdp_hold: str = choice("step", "micro_batch")
    """dp_mode=fsdp: step keeps what FSDP gathers or accumulates through the step (under a pipeline every
    block's gathered parameters, one all-gather per unit and step; without one the unsharded gradients, one
    reduce-scatter per unit and step); micro_batch reshards after every forward and reduce-scatters every
    micro-batch: less memory for more collectives (torch's pipeline stages still reduce once per step)."""
    sequence_parallel: bool = False
    """With tp > 1: shard norms' activations over the sequence dimension."""
    pp_schedule: str = choice("1f1b", "gpipe", "interleaved_1f1b")
    """Pipeline schedule."""
    pp_stages_per_rank: int = 1
    """Virtual stages per rank (interleaved_1f1b needs 2 or more)."""
    pp_layers: list[int] = field(default_factory=list)
    """Layers per stage, overriding the even split (length pp * pp_stages_per_rank)."""
    activation_checkpoint: str = choice("none", "full", "selective")
    """Recompute block activations in backward: none, every block, or every ac_every-th block."""
    ac_every: int = 2
    """selective: checkpoint every k-th block."""
    compile: bool = False
    """torch.compile each block."""
    ep_overlap: str = choice("none", "shared", "chunked")
    """With ep > 1: hide the all-to-alls behind the shared experts, or behind another chunk's experts."""
    ep_chunks: int = 2
    """ep_overlap=chunked: token chunks per MoE layer."""

    def check(self) -> None:
        """Raises ValueError naming the first field whose value breaks a rule of its own (the rules against the
        world size, the model and the batch are `ParallelDims.from_config` and `job.layout.check_layout`)."""
        check_fields(self, "parallel.")
        for name in ("pp_stages_per_rank", "ac_every", "ep_chunks"):
            require(getattr(self, name) >= 1, f"parallel.{name}", getattr(self, name), "must be >= 1")
