"""Gradient norm and clipping over any layout.

Each rank holds a different slice of the parameters: DTensor shards (tp, FSDP), expert shards (ep) and
whole pipeline stages (pp). The global norm sums squares over all of them exactly once; replicas (tp-
replicated norms and routers, edp expert replicas) are counted once because each rank counts what it holds
and the sums run only over the axes that split parameters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moeyard.parallel.data_parallel import is_expert_param


def _sq_norm(grad: torch.Tensor) -> torch.Tensor:
    if isinstance(grad, DTensor):
        return torch.linalg.vector_norm(grad).full_tensor().float().square()
    return torch.linalg.vector_norm(grad).float().square()


def global_grad_norm(
    named_params: list[tuple[str, torch.nn.Parameter]],
    ep_group: dist.ProcessGroup | None,
    pp_group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """The L2 norm of all gradients of the model, identical on every rank."""
    device = named_params[0][1].device
    dense, expert = torch.zeros((), device=device), torch.zeros((), device=device)
    for fqn, param in named_params:
        if param.grad is None:
            continue
        if is_expert_param(fqn):
            expert += _sq_norm(param.grad)
        else:
            dense += _sq_norm(param.grad)
    if ep_group is not None and dist.get_world_size(ep_group) > 1:
        dist.all_reduce(expert, group=ep_group)
    total = dense + expert
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


@torch.no_grad()
def clip_grads(named_params: list[tuple[str, torch.nn.Parameter]], max_norm: float, ep_group, pp_group) -> torch.Tensor:
    """Scales gradients so their global norm is at most `max_norm` (0 = measure only); returns the norm."""
    norm = global_grad_norm(named_params, ep_group, pp_group)
    if max_norm > 0:
        # The scale stays on the device: reading the norm on the host would synchronise every step.
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, param in named_params:
            if param.grad is not None:
                param.grad.mul_(scale)
    return norm


@torch.no_grad()
def scale_grads(params: list[torch.nn.Parameter], factor: float) -> None:
    for param in params:
        if param.grad is not None:
            param.grad.mul_(factor)
