"""ZeRO-1 (parallel.dp_mode=zero1) and fp32 master weights for bf16 parameters (parallel.param_dtype=bf16):
AdamW whose state each data-parallel rank holds for its own slice of every parameter only.

A parameter's local tensor (its TP shard, or its ep rank's block of experts) is split like torch.chunk over
the ranks that hold replicas of it, the same ranks its gradient is averaged over: dp for dense weights, edp
for experts. Rows (dim 0) are split, or dim 1 where there are fewer rows than ranks and dim 1 divides evenly,
as FSDP2 splits experts (`expert_shard`): every rank then owns a box of the full tensor, which DCP saves and
reshards like any other shard (`ZeroAdamW.layout_free_state`).

A step: gradients arrive all-reduced and clipped (replicated, as in dp_mode=replicate, so the global norm is
today's); each rank runs AdamW on its slices only, its fp32 master slice being a view of the parameter when
parameters are fp32 and a copy when they are bf16 (then written back rounded); the updated slices are
all-gathered over dp and edp in buckets of at most BUCKET_BYTES, as DDP buckets its all-reduce. Per element
a rank keeps the parameter and its gradient (4 + 4 B, bf16: 2 + 2 B) and 1/ways of AdamW's two moments (8 B,
bf16 parameters: 12 B with the master): parallel/memory.py counts it.

Not torch's ZeroRedundancyOptimizer: it gives each rank whole parameters (uneven: one embedding can exceed a
rank's share), shards over one process group (experts need edp, dense weights dp), keeps no fp32 masters for
bf16 parameters, and gathers its state dict on one rank instead of saving shards through DCP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from moeyard.parallel.compat import all_gather_into
from moeyard.parallel.data_parallel import BUCKET_BYTES, expert_shard, is_expert_param
from moeyard.parallel.dims import Axis
from moeyard.parallel.shards import layout_free


def chunk_bounds(size: int, ways: int, index: int) -> tuple[int, int]:
    """(start, length) of chunk `index` of `size` rows split `ways` ways as torch.chunk (and DTensor's Shard)
    split them: ceil(size / ways) rows each, the last ones shorter or empty."""
    rows = -(-size // ways)
    start = min(index * rows, size)
    return start, min(size, start + rows) - start


def owned_dim(shape: torch.Size, ways: int) -> int:
    """The dim a parameter's local tensor is split along (FSDP2's choice for experts, `expert_shard`)."""
    return expert_shard(shape, ways).dim if len(shape) else 0


@dataclass
class Slice:
    """One parameter and the slice of it this rank steps."""

    name: str
    param: torch.nn.Parameter
    local: torch.Tensor
    """The parameter's local tensor (its storage: writes reach the model)."""
    dim: int
    ways: int
    index: int
    """This rank's position among the `ways` ranks that split it."""
    group: dist.ProcessGroup | None
    master: torch.Tensor
    """fp32 leaf AdamW steps: a view of `local` (fp32 parameters) or a copy of its slice (bf16)."""

    def owned(self, t: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """Rank `index`'s slice (this rank's by default) of `t`, a tensor shaped like `local`."""
        start, length = chunk_bounds(self.local.shape[self.dim], self.ways, self.index if index is None else index)
        return t.narrow(self.dim, start, length)

    @property
    def padded(self) -> int:
        """Elements of the largest slice: each rank's share of an all-gather."""
        rows = -(-self.local.shape[self.dim] // self.ways)
        return rows * self.local[0].numel() if self.dim == 0 else rows * self.local.numel() // self.local.shape[1]


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if isinstance(t, DTensor) else t).detach()


class ZeroAdamW(torch.optim.AdamW):
    """torch's AdamW over this rank's fp32 master slices (module docstring); the trainer drives it as any
    optimizer: `step` also writes the parameters back and all-gathers them, `zero_grad` clears the model's."""

    def __init__(self, pm, shard: bool, weight_decay: float, **adamw) -> None:
        """`pm`: the ParallelModel; `shard`: split over dp/edp (zero1), else each rank steps whole parameters
        (bf16 parameters under dp_mode=replicate); `adamw`: AdamW's options."""
        self.pm = pm
        self.slices = [self._slice(name, p, shard) for name, p in pm.named_parameters()]
        self.masters_current = all(s.master.data_ptr() == s.owned(s.local).data_ptr() for s in self.slices)
        """False while bf16 parameters may hold values newer than the masters (built, or loaded weights
        only): the first step takes the masters from them (`take_masters`)."""
        decay = [s.master for s in self.slices if s.param.ndim >= 2]
        rest = [s.master for s in self.slices if s.param.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
        super().__init__([g for g in groups if g["params"]], **adamw)

    def _slice(self, name: str, param: torch.nn.Parameter, shard: bool) -> Slice:
        expert = is_expert_param(name)
        groups = self.pm.groups
        group = (groups.edp if expert else groups.dp) if shard else None
        ways = dist.get_world_size(group) if group is not None else 1
        index = dist.get_rank(group) if group is not None else 0
        local = _local(param)
        dim = owned_dim(local.shape, ways)
        view = Slice(name, param, local, dim, ways, index, group, local).owned(local)
        master = view if param.dtype == torch.float32 else view.float()
        return Slice(name, param, local, dim, ways, index, group, master)

    @torch.no_grad()
    def take_masters(self) -> None:
        """Masters from the parameters (bf16 values widen exactly)."""
        for s in self.slices:
            if s.master.data_ptr() != s.owned(s.local).data_ptr():
                s.master.copy_(s.owned(s.local))
        self.masters_current = True

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """AdamW on this rank's slices, then every rank's updated slices into every replica's parameters."""
        assert closure is None, "ZeroAdamW takes no closure"
        if not self.masters_current:
            self.take_masters()
        for s in self.slices:
            grad = s.param.grad
            s.master.grad = None if grad is None else s.owned(_local(grad)).to(torch.float32)
        super().step()
        self.params_from_masters()

    @torch.no_grad()
    def params_from_masters(self) -> None:
        """Writes each master slice into its parameter (rounded to bf16 where it is) and all-gathers them."""
        for s in self.slices:
            own = s.owned(s.local)
            if own.data_ptr() != s.master.data_ptr():
                own.copy_(s.master)
        self.masters_current = True
        by_group: dict[int, list[Slice]] = {}
        for s in self.slices:
            if s.ways > 1:
                by_group.setdefault(id(s.group), []).append(s)
        for slices in by_group.values():
            for bucket in _buckets(slices):
                _all_gather_bucket(bucket)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The masters' gradients (views of the model's) and the model's own."""
        super().zero_grad(set_to_none)
        for s in self.slices:
            if set_to_none:
                s.param.grad = None
            elif s.param.grad is not None:
                s.param.grad.zero_()

    def layout_free_state(self) -> dict[str, torch.Tensor]:
        """The checkpoint entries of this optimizer, named and shaped as dp_mode=replicate's
        ("optim.NAME.exp_avg" at the full parameter's shape, each rank's slice a DTensor shard of it), so a
        checkpoint reshards across replicate, zero1 and fsdp and any degrees. With bf16 parameters the fp32
        masters stand for the weights ("model.NAME"): checkpoints hold fp32 weights in every mode."""
        if not self.masters_current:
            self.take_masters()
        state = {}
        for s in self.slices:
            for key, value in self.state[s.master].items():
                state[f"optim.{s.name}.{key}"] = value if value.ndim == 0 else self._describe(s, value)
            if s.master.dtype != s.param.dtype:
                state[f"model.{s.name}"] = self._describe(s, s.master)
        return state

    def _describe(self, s: Slice, t: torch.Tensor) -> torch.Tensor:
        """`t` (shaped like this rank's slice of `s`) as a DTensor of the full parameter's shape, or as it is
        where nothing splits the parameter. Over the parameter's own mesh (tp, or ep) the split over dp/edp
        is the outer axis; where both split one dim, it cuts the inner one's block (`_StridedShard`, the
        form FSDP2 uses for FSDP over tensor parallelism)."""
        dims, expert = self.pm.dims, is_expert_param(s.name)
        whole = layout_free(s.name, s.param, dims, self.pm.expert_mesh)
        base_mesh, base = (whole.device_mesh, list(whole.placements)) if isinstance(whole, DTensor) else (None, [])
        if s.ways == 1:
            if base_mesh is None:
                return t
            return _from_local(t, base_mesh, base, whole.shape)
        root: DeviceMesh = self.pm.expert_mesh if expert else self.pm.mesh
        axis = (Axis.EDP if expert else Axis.DP).value
        names = (axis, *(base_mesh.mesh_dim_names if base_mesh is not None else ()))
        inner = math.prod(base_mesh.size(i) for i, p in enumerate(base) if p.is_shard(s.dim)) if base else 1
        outer = _StridedShard(s.dim, split_factor=inner) if inner > 1 else Shard(s.dim)
        return _from_local(t, root[names], [outer, *base], whole.shape)


def _from_local(t: torch.Tensor, mesh: DeviceMesh, placements: list, shape: torch.Size) -> DTensor:
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))  # contiguous
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)


def _buckets(slices: list[Slice]) -> list[list[Slice]]:
    """Consecutive runs of `slices` of one dtype gathering at most BUCKET_BYTES each."""
    buckets: list[list[Slice]] = []
    size = 0
    for s in slices:
        nbytes = s.padded * s.ways * s.local.element_size()
        if not buckets or size + nbytes > BUCKET_BYTES or s.local.dtype != buckets[-1][0].local.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(s)
        size += nbytes
    return buckets


def _all_gather_bucket(bucket: list[Slice]) -> None:
    """Every rank's slices of `bucket`'s parameters, each padded to the largest, in one all-gather."""
    sizes = [s.padded for s in bucket]
    first = bucket[0]
    send = torch.zeros(sum(sizes), dtype=first.local.dtype, device=first.local.device)
    for s, piece in zip(bucket, send.split(sizes), strict=True):
        own = s.owned(s.local)
        piece[: own.numel()].copy_(own.reshape(-1))
    out = torch.empty(first.ways * send.numel(), dtype=send.dtype, device=send.device)
    all_gather_into(out, send, first.group)
    for index, block in enumerate(out.view(first.ways, -1)):
        for s, piece in zip(bucket, block.split(sizes), strict=True):
            if index != s.index:
                dst = s.owned(s.local, index)
                dst.copy_(piece[: dst.numel()].view(dst.shape))
