"""Model-state memory per rank, on paper: one rank's model built on the meta device, its local shards counted.

`meta_rank` builds any rank of a job of any size in this one process: a fake process group (no peers, no
communication) stands in for the job and the meta device for the GPU, so even a 672 B-parameter model costs
no memory. `rank_memory` then counts what that rank holds while it trains:

- model state, 16 B per local parameter element: the fp32 master weight, its fp32 gradient and AdamW's two
  fp32 moments (fused AdamW, the CUDA default, adds no per-element temporaries);
- FSDP's transient copies, per element of a gathered unit (its TP and EP shard, no longer split over dp or
  edp): the bf16 parameter, its bf16 gradient and the fp32 reduce-scatter input, 2 + 2 + 4 = 8 B (fp32
  training: 12 B). Counted are the root unit (embedding, final norm, output: FSDP2 keeps the root gathered
  from forward to backward) and two blocks with their experts, the one running and the one prefetched.

Activations are not counted: they depend on the batch, the schedule and checkpointing, and are what the rest
of the GPU's memory is for.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moe.config import ModelConfig, MoEConfig
from parallel.config import ParallelConfig
from parallel.data_parallel import is_expert_param
from parallel.dims import Axis, ParallelDims
from parallel.parallelize import ParallelModel, build_parallel_model

STATE_BYTES = 16
"""fp32 parameter + fp32 gradient + AdamW exp_avg + exp_avg_sq, per local element."""
_FSDP_AXES = (Axis.DP.value, Axis.EDP.value)


@dataclass(frozen=True)
class RankMemory:
    """What one rank holds, in elements, and what it costs, in bytes."""

    params: int
    """Elements of this rank's local parameter shards."""
    gathered_root: int
    """Elements of the root FSDP unit (embedding, final norm, output) once gathered; 0 on a middle stage."""
    gathered_block: int
    """Elements of this rank's largest block, its experts included, once gathered."""
    bf16: bool
    """FSDP gathers bf16 parameters (train.dtype=bf16) rather than fp32 ones."""

    @property
    def state_bytes(self) -> int:
        return STATE_BYTES * self.params

    @property
    def transient_bytes(self) -> int:
        per_element = (2 + 2 if self.bf16 else 4 + 4) + 4  # parameter, gradient, fp32 reduce-scatter input
        return per_element * (self.gathered_root + 2 * self.gathered_block)

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.transient_bytes


def local_numel(param: torch.Tensor) -> int:
    """Elements this rank stores of `param` (a DTensor's local shard)."""
    return (param.to_local() if isinstance(param, DTensor) else param).numel()


def _sharded_axes(param: torch.Tensor) -> list[tuple[str, int]]:
    """(mesh axis name, size) of each axis a DTensor is split over; none for a plain tensor."""
    if not isinstance(param, DTensor):
        return []
    mesh = param.device_mesh
    names = mesh.mesh_dim_names or ()
    # Not `is_shard()`: FSDP over a tensor-parallel dim 0 places a _StridedShard, which is not a Shard.
    split = [not (p.is_replicate() or p.is_partial()) for p in param.placements]
    return [(names[i], mesh.size(i)) for i, s in enumerate(split) if s]


def shard_count(name: str, param: torch.Tensor, ep: int) -> int:
    """Different shards of parameter `name` among the ranks of its pipeline stage (TP x FSDP, times ep for
    experts, whose tensor on a rank is already its ep block of E/ep experts)."""
    return prod(size for _, size in _sharded_axes(param)) * (ep if is_expert_param(name) else 1)


def gathered_numel(param: torch.Tensor) -> int:
    """Elements of `param` on this rank while FSDP has gathered it (TP and EP shards stay split).

    Assumes even FSDP shards, which the shipped presets have (tests/unit/test_presets_fit.py checks it).
    """
    return local_numel(param) * prod(size for axis, size in _sharded_axes(param) if axis in _FSDP_AXES)


def rank_memory(pm: ParallelModel, bf16: bool) -> RankMemory:
    """Counts this rank's parameter shards and FSDP's gathered units (see the module docstring)."""
    root, blocks = 0, {}
    for name, param in pm.named_parameters():
        if name.startswith("layers."):
            lid = name.split(".")[1]
            blocks[lid] = blocks.get(lid, 0) + gathered_numel(param)
        else:
            root += gathered_numel(param)
    return RankMemory(
        params=sum(local_numel(p) for _, p in pm.named_parameters()),
        gathered_root=root,
        gathered_block=max(blocks.values(), default=0),
        bf16=bf16,
    )


@contextmanager
def meta_rank(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    pcfg: ParallelConfig,
    world_size: int,
    rank: int,
    bf16: bool = True,
) -> Iterator[ParallelModel]:
    """Rank `rank` of a `world_size`-rank job, built on the meta device under a fake process group.

    Nothing is allocated and nothing is communicated. The process must not be in a process group already;
    the fake one is destroyed on exit, so the next rank can be built after it.
    """
    dims = ParallelDims.from_config(pcfg, world_size)
    dist.init_process_group("fake", rank=rank, world_size=world_size)
    try:
        # The mesh's device type only names where collectives would run; the fake group runs none.
        mesh = dims.build_mesh("cpu") if dims.is_distributed else None
        expert_mesh = dims.build_expert_mesh("cpu") if dims.is_distributed else None
        yield build_parallel_model(
            model_cfg, moe_cfg, pcfg, dims, mesh, expert_mesh, torch.device("meta"), seed=0, bf16=bf16, init=False
        )
    finally:
        dist.destroy_process_group()
