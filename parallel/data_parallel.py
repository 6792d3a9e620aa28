"""Data parallelism: FSDP2 (`fully_shard`) or replicated parameters with an all-reduce of gradients.

Expert weights differ across ep ranks, so their gradients are reduced over the expert-data-parallel axis
"edp" only, while every other parameter reduces over "dp". Both are divided by dp: the loss is the mean over
all dp ranks, and each expert already received the tokens of its whole ep group through the all-to-all.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from moe.model import Transformer

_EXPERT_PARAM = re.compile(r"(^|\.)experts\.w[123]$")
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_fqn(fqn: str) -> str:
    """Parameter name without activation-checkpoint / compile wrapper prefixes (stable across layouts)."""
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


def is_expert_param(fqn: str) -> bool:
    return bool(_EXPERT_PARAM.search(clean_fqn(fqn)))


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, edp_mesh: DeviceMesh, bf16: bool) -> None:
    """Shards experts over edp and everything else over dp, one FSDP unit per block (FSDP2)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for block in model.layers.values():
        moe = _unwrap(block).moe
        if moe is not None:
            fully_shard(moe.experts, mesh=edp_mesh, mp_policy=mp)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_checkpoint_wrapped_module", module)


@torch.no_grad()
def allreduce_grads(
    model: torch.nn.Module, dp_group: dist.ProcessGroup | None, edp_group: dist.ProcessGroup | None, dp: int
) -> None:
    """Averages replicated gradients: experts over edp, the rest over dp; one flat buffer per group.

    Hand-written rather than DDP because DDP reduces all parameters over one group and does not take DTensor
    (tensor-parallel) parameters; flattening keeps it to two collectives per step.
    """
    dense, expert = [], []
    for fqn, param in model.named_parameters():
        if param.grad is not None:
            (expert if is_expert_param(fqn) else dense).append(_local(param.grad))
    for grads, group in ((dense, dp_group), (expert, edp_group)):
        if not grads:
            continue
        flat = torch.cat([g.flatten() for g in grads])
        if group is not None:  # None: a size-1 axis (never the default group)
            dist.all_reduce(flat, group=group)
        flat.div_(dp)
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(chunk.view_as(g))


@torch.no_grad()
def finish_grads(
    parts: list[torch.nn.Module],
    mode: str,
    dp_group: dist.ProcessGroup | None,
    edp_group: dist.ProcessGroup | None,
    dp: int,
    ep: int,
) -> None:
    """Completes the data-parallel gradient mean after backward.

    FSDP2 has already averaged over each unit's mesh: dp for dense weights, edp = dp/ep for experts, so expert
    gradients still need 1/ep. (FSDP2's own divide factor uses PREMUL_SUM, which gloo lacks.)
    """
    if dp == 1:
        return
    for part in parts:
        if mode == "replicate":
            allreduce_grads(part, dp_group, edp_group, dp)
        elif ep > 1:
            for fqn, param in part.named_parameters():
                if param.grad is not None and is_expert_param(fqn):
                    param.grad.div_(ep)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
