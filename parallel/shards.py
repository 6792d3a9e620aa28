"""Where this rank's shard of a parameter sits in the full (one-process) tensor, whatever the layout.

TP and FSDP parameters are DTensors and know it already; expert weights under EP are plain [E/ep, ...] blocks
(or FSDP DTensors over edp of such a block), which `layout_free` describes as DTensors over the experts' mesh
without moving data. Initialisation fills shards by their offsets, DCP saves and loads them, and the
Hugging Face import reads exactly their slices: all from this one description.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from moeyard.parallel.data_parallel import is_expert_param
from moeyard.parallel.dims import Axis, ParallelDims


def fsdp_expert_placements(ep: int) -> list[Placement]:
    """Placements on the expert mesh (edp, ep) of the full [E, ...] expert tensor when FSDP shards each ep
    rank's [E/ep, ...] block again over edp: dim 0 split by ep first (right to left), then by edp."""
    return [_StridedShard(0, split_factor=ep), Shard(0)]


def layout_free(name: str, t: torch.Tensor, dims: ParallelDims, expert_mesh: DeviceMesh | None) -> torch.Tensor:
    """`t` as DCP should see it: a tensor or DTensor whose global shape and offset are those of the full
    (one-process) model, sharing `t`'s storage, so that a save writes and a load fills only this rank's shard.

    Expert weights under EP are the rank's [E/ep, ...] block (ep rank r holds block r), either plain (a
    DTensor over the expert mesh's ep axis) or sharded again over edp by FSDP (torch.chunk rows, possibly
    uneven; a DTensor over (edp, ep) with `fsdp_expert_placements`, the `_StridedShard` form FSDP2 itself
    uses for a dim sharded twice). Nothing is gathered or copied.
    """
    t = t.detach()
    if t.ndim == 0 or not (is_expert_param(name) and dims.ep > 1):
        return t
    mesh, ep = expert_mesh, dims.ep
    if not isinstance(t, DTensor):  # from_local shares storage: DCP loads straight into the parameter
        return DTensor.from_local(t, mesh[Axis.EP.value], [Shard(0)], run_check=False)
    placements = tuple(t.placements)
    assert t.device_mesh.mesh_dim_names == (Axis.EDP.value,) and placements in ((Shard(0),), (Shard(1),)), (name, t)
    shape = torch.Size((t.shape[0] * ep, *t.shape[1:]))
    return DTensor.from_local(
        t.to_local(),
        mesh[(Axis.EDP.value, Axis.EP.value)],
        # FSDP's Shard(1) (fewer local experts than edp ranks, data_parallel.expert_shard) splits another dim.
        fsdp_expert_placements(ep) if placements == (Shard(0),) else [Shard(1), Shard(0)],
        run_check=False,
        shape=shape,
        stride=tuple(math.prod(shape[i + 1 :]) for i in range(len(shape))),  # contiguous
    )


def shard_extent(
    name: str, t: torch.Tensor, dims: ParallelDims, expert_mesh: DeviceMesh | None
) -> tuple[torch.Size, tuple[int, ...], torch.Tensor]:
    """The full (one-process) shape of `name`, the offset of this rank's shard in it, and the shard itself
    (a view of `t`'s storage: writing it fills `t`). Every layout's shard is one box of the full tensor
    (nested splits of a dim are nested blocks), which the shape and offset describe."""
    t = layout_free(name, t, dims, expert_mesh)
    if not isinstance(t, DTensor):
        return t.shape, (0,) * t.ndim, t
    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    assert tuple(shape) == tuple(local.shape), (name, shape, local.shape)
    return t.shape, tuple(offset), local
