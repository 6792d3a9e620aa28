"""Parallel layout configuration: `ParallelConfig`, the Hydra schema of the `parallel` group, and its own checks.

The rules that need the model or the world size (degrees dividing heads, experts, the batch) are in
`moeyard.job.layout` and `ParallelDims`; docs/parallel.md describes every layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeyard.moe.config import check_fields, choice, require


@dataclass(kw_only=True)
class ParallelConfig:
    """Degrees of each parallelism and how they are applied.

    World size = pp * dp * tp. Expert parallelism folds over the data- and tensor-parallel ranks of a pipeline
    stage: its dp * tp ranks are regrouped into edp * ep, the ep consecutive ranks of a group split each MoE
    layer's experts (tp ranks first, then neighbouring dp ranks), and the edp = dp * tp / ep groups hold
    replicas of the same experts.
    """

    dp: int = -1
    """Data-parallel degree; -1 infers world_size / (pp * tp)."""
    tp: int = 1
    """Tensor-parallel degree (attention heads, dense FFN, vocabulary)."""
    pp: int = 1
    """Pipeline-parallel degree (stages over ranks)."""
    ep: int = 1
    """Expert-parallel degree; divides dp * tp and moe.num_experts."""
    dp_mode: str = choice("replicate", "fsdp")
    """Replicate parameters and all-reduce gradients, or shard parameters, grads and optimizer state (FSDP2)."""
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
