"""Gradient norm and clipping over any layout.

Each rank holds a different slice of the parameters: DTensor shards (tp, FSDP), expert shards (ep) and
whole pipeline stages (pp). The global norm sums squares over all of them exactly once; replicas (tp-
replicated norms and routers, edp expert replicas) are counted once because each rank counts what it holds
and the sums run only over the axes that split parameters.

Squares are summed locally, per set of axes a parameter is split over, and each process group then takes
one all-reduce, whatever the number of parameters (torch's `clip_grad_norm_` on DTensors reduces each
parameter's norm separately: a collective per parameter).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from moeyard.parallel.data_parallel import is_expert_param
from moeyard.parallel.dims import Axis

_AXIS_ORDER = [axis.value for axis in Axis]


def _split_over(
    fqn: str, grad: torch.Tensor, ep_group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, list[tuple[str, dist.ProcessGroup]]]:
    """`grad`'s local values and the (mesh axis, group) pairs whose ranks hold different slices of it."""
    axes: list[tuple[str, dist.ProcessGroup]] = []
    if isinstance(grad, DTensor):
        if any(p.is_partial() for p in grad.placements):  # a pending sum: its square is not the sum of squares
            grad = grad.redistribute(placements=[Replicate() if p.is_partial() else p for p in grad.placements])
        mesh = grad.device_mesh
        # Not `is_shard()`: FSDP over a tensor-parallel dim 0 places a _StridedShard, which is not a Shard.
        split = [i for i, p in enumerate(grad.placements) if not p.is_replicate() and mesh.size(i) > 1]
        axes = [(mesh.mesh_dim_names[i], mesh.get_group(i)) for i in split]
        grad = grad.to_local()
    if ep_group is not None and is_expert_param(fqn):  # a plain [E/ep, ...] block of this ep rank's experts
        axes.append((Axis.EP.value, ep_group))
    return grad, axes


def global_grad_norm(
    named_params: list[tuple[str, torch.nn.Parameter]],
    ep_group: dist.ProcessGroup | None,
    pp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """The L2 norm of all gradients of the model, identical on every rank.

    One local sum of squares per set of groups parameters are split over (`sums_K`, K such sets), then one
    all-reduce of all K sums per group: over a group that does not split set k, its rank 0 alone contributes
    sum k (the others hold the same replica), so each sum is reduced exactly over its own groups. Every rank
    visits its groups in the one order of the mesh axes (ranks serving two axes, as dp and edp do when
    ep = 1, count once), so no two ranks wait on each other's collectives in opposite orders.
    """
    device = named_params[0][1].device
    keys: dict[frozenset[tuple[int, ...]], list[torch.Tensor]] = {}
    groups: dict[tuple[int, ...], tuple[int, dist.ProcessGroup]] = {}  # ranks -> (first axis position, group)
    for fqn, param in named_params:
        if param.grad is None:
            continue
        local, axes = _split_over(fqn, param.grad, ep_group)
        # A group is known by its ranks: the two meshes build separate groups over the same ranks (dp and edp
        # when ep = 1), and the same ranks must not be summed over twice.
        ranks = [tuple(dist.get_process_group_ranks(group)) for _, group in axes]
        for (name, group), members in zip(axes, ranks, strict=True):
            position = _AXIS_ORDER.index(name)
            groups[members] = (min(position, groups.get(members, (position, None))[0]), group)
        square = torch.linalg.vector_norm(local, dtype=torch.float32).square()
        keys.setdefault(frozenset(ranks), []).append(square)
    sums_K = torch.stack([torch.stack(s).sum() for s in keys.values()]) if keys else torch.zeros(1, device=device)
    for members, (_, group) in sorted(groups.items(), key=lambda item: item[1][0]):
        splits_K = torch.tensor([members in key for key in keys], device=device)
        sums_K = torch.where(splits_K | (dist.get_rank(group) == 0), sums_K, torch.zeros_like(sums_K))
        dist.all_reduce(sums_K, group=group)
    total = sums_K.sum()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


@torch.no_grad()
def clip_grads(
    named_params: list[tuple[str, torch.nn.Parameter]],
    max_norm: float,
    ep_group,
    pp_group,
    also_scale: list[torch.nn.Parameter] = (),
) -> torch.Tensor:
    """Scales gradients so their global norm is at most `max_norm` (0 = measure only); returns the norm.
    `also_scale`: copies of counted parameters (another stage holds and counts them), scaled alike."""
    norm = global_grad_norm(named_params, ep_group, pp_group)
    if max_norm > 0:
        # The scale stays on the device: reading the norm on the host would synchronise every step.
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, param in [*named_params, *(("", p) for p in also_scale)]:
            if param.grad is not None:
                param.grad.mul_(scale)
    return norm


@torch.no_grad()
def scale_grads(params: list[torch.nn.Parameter], factor: float) -> None:
    for param in params:
        if param.grad is not None:
            param.grad.mul_(factor)
