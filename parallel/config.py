"""Parallel layout configuration (the Hydra schema of the `parallel` group)."""

from __future__ import annotations

from dataclasses import dataclass, field

from moeyard.moe.config import choice


@dataclass(kw_only=True)
class ParallelConfig:
    """Degrees of each parallelism and how they are applied.

    World size = pp * dp * tp. Expert parallelism folds into data parallelism: the ep ranks of an MoE layer
    are ep consecutive data-parallel ranks, and the remaining dp/ep ranks (expert-data-parallel) hold
    replicas of the same experts.
    """

    dp: int = -1
    """Data-parallel degree; -1 infers world_size / (pp * tp)."""
    tp: int = 1
    """Tensor-parallel degree (attention heads, dense FFN, vocabulary)."""
    pp: int = 1
    """Pipeline-parallel degree (stages over ranks)."""
    ep: int = 1
    """Expert-parallel degree; divides dp and moe.num_experts."""
    dp_mode: str = choice("replicate", "fsdp")
    """Replicate parameters and all-reduce gradients, or shard parameters, grads and optimizer state (FSDP2)."""
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
