"""Gathering the full (unsharded) parameters of a parallel model, as one process would hold them."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallel.data_parallel import is_expert_param


@torch.no_grad()
def full_state_dict(pm) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer at full shape, on CPU, on every rank (a collective)."""
    state: dict[str, torch.Tensor] = {}
    for name, param in pm.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param.detach()
        if is_expert_param(name) and pm.groups.ep is not None:
            shards = [torch.empty_like(full) for _ in range(dist.get_world_size(pm.groups.ep))]
            dist.all_gather(shards, full.contiguous(), group=pm.groups.ep)
            full = torch.cat(shards)
        state[name] = full.cpu().clone()
    for lid, moe in pm.moe_layers().items():
        state[f"layers.{lid}.moe.router.expert_bias"] = moe.router.expert_bias.detach().cpu().clone()
    if pm.groups.pp is not None:
        parts: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size(pm.groups.pp))]
        dist.all_gather_object(parts, state, group=pm.groups.pp)
        state = {k: v for part in parts for k, v in part.items()}
    return state
