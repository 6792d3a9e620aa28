"""Gathering the full (unsharded) parameters and optimizer state of a parallel model, as one process would
hold them. For tests and small-model tools only: every rank ends up with whole tensors."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moeyard.parallel.data_parallel import is_expert_param
from moeyard.parallel.zero import ZeroAdamW


def _full(pm, name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` (this rank's view of parameter `name`, or a tensor sharded like it) at full shape, on CPU."""
    full = t.full_tensor() if isinstance(t, DTensor) else t.detach()
    if is_expert_param(name) and pm.groups.ep is not None:
        shards = [torch.empty_like(full) for _ in range(dist.get_world_size(pm.groups.ep))]
        dist.all_gather(shards, full.contiguous(), group=pm.groups.ep)
        full = torch.cat(shards)
    return full.cpu().clone()


def _merge_stages(pm, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each pipeline stage holds its own names: the union over the pp group."""
    if pm.groups.pp is None:
        return state
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size(pm.groups.pp))]
    dist.all_gather_object(parts, state, group=pm.groups.pp)
    return {k: v for part in parts for k, v in part.items()}


@torch.no_grad()
def full_state_dict(pm) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer at full shape, on CPU, on every rank (a collective)."""
    state = {name: _full(pm, name, param) for name, param in pm.named_parameters()}
    for lid, moe in pm.moe_layers().items():
        state[f"layers.{lid}.moe.router.expert_bias"] = moe.router.expert_bias.detach().cpu().clone()
    return _merge_stages(pm, state)


@torch.no_grad()
def full_optimizer_state(pm, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state per parameter at full shape ("NAME.exp_avg", "NAME.exp_avg_sq", "NAME.step"), on CPU,
    on every rank (a collective)."""
    if isinstance(optimizer, ZeroAdamW):  # slices of each parameter (parallel/zero.py), described as DTensors
        return _merge_stages(pm, _full_zero_state(optimizer))
    state = {}
    for name, param in pm.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            state[f"{name}.{key}"] = value.detach().cpu().clone() if value.ndim == 0 else _full(pm, name, value)
    return _merge_stages(pm, state)


def _full_zero_state(optimizer: ZeroAdamW) -> dict[str, torch.Tensor]:
    """ZeroAdamW's moments and step counts at full shape (its checkpoint entries, gathered), on CPU."""
    state = {}
    for key, value in optimizer.layout_free_state().items():
        if key.startswith("optim."):
            full = value.full_tensor() if isinstance(value, DTensor) else value.detach()
            state[key.removeprefix("optim.")] = full.cpu().clone()
    return state
