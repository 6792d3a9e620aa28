"""Data parallelism: FSDP2 (`fully_shard`) or replicated parameters with an all-reduce of gradients.

Expert weights differ across ep ranks, so their gradients are reduced over the expert-data-parallel axis
"edp" only, while every other parameter reduces over "dp". Both are divided by dp: the loss is the mean over
all dp ranks, and each expert already received the tokens of its whole ep group through the all-to-all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moeyard.moe.model import Transformer

_EXPERT_PARAM = re.compile(r"(^|\.)experts\.[wb][123]$")  # weights, and biases (moe.expert_biases)
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def clean_fqn(fqn: str) -> str:
    """Parameter name without activation-checkpoint / compile wrapper prefixes (stable across layouts)."""
    for prefix in _WRAPPER_PREFIXES:
        fqn = fqn.replace(prefix, "")
    return fqn


def is_expert_param(fqn: str) -> bool:
    return bool(_EXPERT_PARAM.search(clean_fqn(fqn)))


def expert_shard(local_EXY: torch.Size, edp: int) -> Shard:
    """Which dim FSDP splits a rank's [E_local, X, Y] expert weight along over edp: the expert dim, unless
    there are fewer local experts than edp ranks and the next dim splits evenly (FSDP2 pads only dim 0: with
    E_local < edp some ranks would hold nothing and others whole experts)."""
    if len(local_EXY) > 1 and local_EXY[0] < edp and local_EXY[1] % edp == 0:
        return Shard(1)
    return Shard(0)


def apply_fsdp(
    model: Transformer, dp_mesh: DeviceMesh, edp_mesh: DeviceMesh, bf16: bool, reshard_after_forward: bool = True
) -> None:
    """Shards experts over edp and everything else over dp, one FSDP unit per block (FSDP2).

    reshard_after_forward=False is dp_mode=zero2: each unit is gathered once a step, before its forward, and
    kept to its backward, whose gradients are reduce-scattered (ZeRO-2's traffic: one all-gather and one
    reduce-scatter of the parameters a step). Chosen over a hand-written ZeRO-2 on replicated parameters
    because FSDP2 reduce-scatters each block's gradients as its backward ends, so the full gradient never
    exists at once (reduce-scattering after backward would hold it at the peak, ZeRO-1's memory), and it
    already composes with tp, ep, pp and DCP; parameters also rest sharded between steps, which only lowers
    memory outside the step.
    """
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    edp = edp_mesh.size()
    keep = {"reshard_after_forward": reshard_after_forward}

    def placement(param: torch.nn.Parameter) -> Shard:
        return expert_shard(param.shape, edp)

    for block in model.layers.values():
        moe = _unwrap(block).moe
        if moe is not None:
            fully_shard(moe.experts, mesh=edp_mesh, mp_policy=mp, shard_placement_fn=placement, **keep)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, **keep)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_checkpoint_wrapped_module", module)


def _fsdp_blocks(parts: Sequence[Transformer]) -> list[FSDPModule]:
    return [block for part in parts for block in part.layers.values() if isinstance(block, FSDPModule)]


@contextmanager
def gathered_through_step(parts: Sequence[Transformer], hold: bool = True) -> Iterator[None]:
    """Under a pipeline schedule: each FSDP block (its experts too) stays gathered from its first micro-batch's
    forward to its last backward, one all-gather per unit and step instead of one per micro-batch and pass.

    A schedule interleaves micro-batches' forwards and backwards on a stage, so resharding after each forward
    re-gathers every block for each of them; torch's stages already keep parameters gathered between
    backwards and reduce-scatter once, after the last (`PipelineStage.perform_reduce_grad`, which reshards).
    The cost is the stage's blocks held gathered for the step (plan/memory.py counts them). Set for the step
    only, not at `fully_shard`: evaluation and checkpoints outside it see parameters sharded as usual. The
    root unit is left alone (FSDP2 keeps it gathered from forward to backward by itself).
    """
    blocks = _fsdp_blocks(parts) if hold else []  # parallel.fsdp_hold=micro_batch: reshard as usual
    for block in blocks:
        block.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for block in blocks:
            block.set_reshard_after_forward(True)


def sync_grads_now(part: torch.nn.Module, sync: bool, keep_gathered: bool = False) -> None:
    """Without a pipeline: FSDP reduce-scatters gradients in the step's last micro-batch's backward only, one
    reduction per step; earlier micro-batches accumulate unsharded gradients (held until then, which
    plan/memory.py counts). The replicated mode reduces once per step anyway (`finish_grads`).

    dp_mode=zero2 reduce-scatters every micro-batch (`sync`; the gradient rests sharded, as ZeRO-2's) and
    keeps the parameters gathered after every backward but the step's last (`keep_gathered`): one all-gather
    a step, as ZeRO-2's replicated parameters cost."""
    if isinstance(part, FSDPModule):
        part.set_requires_gradient_sync(sync)
        part.set_reshard_after_backward(not keep_gathered)


BUCKET_BYTES = 25 * 2**20
"""Most gradient bytes flattened into one all-reduce (DDP's default bucket_cap_mb=25)."""


def _buckets(grads: list[torch.Tensor], cap: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of `grads` of at most `cap` bytes each (a larger tensor forms a bucket of its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if not buckets or size + nbytes > cap or g.dtype != buckets[-1][0].dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(g)
        size += nbytes
    return buckets


def _allreduce_mean(grads: list[torch.Tensor], group: dist.ProcessGroup, dp: int) -> None:
    """Sums `grads` over `group` in place, one bucket per collective, and divides by dp. bf16 gradients
    (parallel.param_dtype=bf16) are summed in fp32, as FSDP's reduce_dtype does, and rounded once."""
    for bucket in _buckets(grads, BUCKET_BYTES):
        alone = len(bucket) == 1 and bucket[0].is_contiguous() and bucket[0].dtype == torch.float32
        flat = bucket[0] if alone else torch.cat([g.flatten() for g in bucket]).float()
        dist.all_reduce(flat, group=group)
        flat.div_(dp)
        if not alone:
            for g, chunk in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(chunk.view_as(g))


@torch.no_grad()
def allreduce_grads(
    model: torch.nn.Module, dp_group: dist.ProcessGroup | None, edp_group: dist.ProcessGroup | None, dp: int
) -> None:
    """Averages replicated gradients: experts over edp, the rest over dp, in buckets of at most BUCKET_BYTES.

    Hand-written rather than DDP because DDP reduces all parameters over one group and does not take DTensor
    (tensor-parallel) parameters. Bucketing (as DDP does) bounds the extra memory and keeps collectives few.
    An axis of size 1 (group None, never the default group) has nothing to reduce: its gradients are only
    divided by dp, in place (no copy).
    """
    dense, expert = [], []
    for fqn, param in model.named_parameters():
        if param.grad is not None:
            (expert if is_expert_param(fqn) else dense).append(_local(param.grad))
    for grads, group in ((dense, dp_group), (expert, edp_group)):
        if group is not None:
            _allreduce_mean(grads, group, dp)
        elif grads and dp > 1:
            torch._foreach_div_(grads, dp)


@torch.no_grad()
def finish_grads(
    parts: list[torch.nn.Module],
    mode: str,
    dp_group: dist.ProcessGroup | None,
    edp_group: dist.ProcessGroup | None,
    dp: int,
    edp: int,
) -> None:
    """Completes the data-parallel gradient mean after backward (`mode` is fsdp only where FSDP was applied).

    The step's gradient is the mean over the dp ranks' losses. An expert's gradient already sums what every
    rank of its ep group sent it, so its edp replicas are summed and divided by dp. FSDP2 has already averaged
    over each unit's mesh (dp for dense weights, edp for experts), so expert gradients still need edp/dp.
    (FSDP2's own divide factor uses PREMUL_SUM, which gloo lacks.)
    """
    for part in parts:
        if mode == "replicate":
            allreduce_grads(part, dp_group, edp_group, dp)
        elif edp != dp:
            grads = [p.grad for fqn, p in part.named_parameters() if p.grad is not None and is_expert_param(fqn)]
            torch._foreach_mul_(grads, edp / dp)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
