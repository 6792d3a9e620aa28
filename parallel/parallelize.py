"""Builds this rank's part of the model: split into pipeline stages, then TP -> EP -> AC -> compile ->
materialise -> DP, one small `apply_*` step each (as torchtitan orders them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining.schedules import _PipelineSchedule
from torch.distributed.tensor import DTensor, distribute_tensor

from moe.config import ModelConfig, MoEConfig
from moe.layer import MoELayer
from moe.model import Transformer, init_full_tensor
from parallel.config import ParallelConfig
from parallel.data_parallel import apply_fsdp, clean_fqn, is_expert_param
from parallel.dims import Axis, ParallelDims
from parallel.expert import apply_ep
from parallel.pipeline import build_schedule, local_stage_ids, split_model, stage_layer_ranges
from parallel.tensor import apply_tp


@dataclass
class Groups:
    """Process groups of this rank (None where the axis has size 1 or there is no mesh)."""

    dp: dist.ProcessGroup | None = None
    edp: dist.ProcessGroup | None = None
    ep: dist.ProcessGroup | None = None
    pp: dist.ProcessGroup | None = None
    tp: dist.ProcessGroup | None = None

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh | None, dims: ParallelDims) -> Groups:
        if mesh is None:
            return cls()
        pick = lambda axis, size: mesh[axis.value].get_group() if size > 1 else None
        return cls(
            dp=pick(Axis.DP, dims.dp),
            edp=pick(Axis.EDP, dims.edp),
            ep=pick(Axis.EP, dims.ep),
            pp=pick(Axis.PP, dims.pp),
            tp=pick(Axis.TP, dims.tp),
        )


@dataclass
class ParallelModel:
    """The model parts this rank holds and how to drive them."""

    parts: list[Transformer]
    stage_ids: list[int]
    n_stages: int
    dims: ParallelDims
    mesh: DeviceMesh | None
    groups: Groups
    schedule: _PipelineSchedule | None = None

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(clean_fqn(n), p) for part in self.parts for n, p in part.named_parameters()]

    def moe_layers(self) -> dict[str, MoELayer]:
        return {lid: moe for part in self.parts for lid, moe in part.moe_layers().items()}

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def materialize(part: Transformer, cfg: ModelConfig, seed: int, device: torch.device, ep_rank: int, ep: int) -> None:
    """Allocates `part` on `device` and fills each local shard from the full tensor one process would have."""
    part.to_empty(device=device)
    for fqn, param in part.named_parameters():
        name = clean_fqn(fqn)
        shape = list(param.shape)
        if is_expert_param(name):
            shape[0] *= ep
        full = init_full_tensor(name, shape, cfg, seed)
        if is_expert_param(name):
            full = full.chunk(ep)[ep_rank]
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
        _local(param).copy_(full)
    for moe in part.moe_layers().values():
        moe.router.expert_bias.zero_()
    part.reset_buffers(device)


def apply_ac(part: Transformer, mode: str, every: int) -> None:
    """Activation checkpointing of whole blocks: all (full) or every k-th (selective)."""
    if mode == "none":
        return
    for lid in list(part.layers.keys()):
        if mode == "full" or int(lid) % every == 0:
            part.layers[lid] = checkpoint_wrapper(part.layers[lid], preserve_rng_state=False)


def apply_compile(part: Transformer) -> None:
    """Compiles each block in place (repeated blocks share one compiled graph)."""
    for block in part.layers.values():
        block.compile()


def build_parallel_model(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    device: torch.device,
    seed: int,
    bf16: bool = False,
) -> ParallelModel:
    """This rank's model parts, sharded and initialised identically to one process's model."""
    groups = Groups.from_mesh(mesh, dims)
    with torch.device("meta"):
        whole = Transformer(model_cfg, moe_cfg)
    n_stages = dims.pp * pcfg.pp_stages_per_rank
    if dims.pp > 1:
        pp_rank = mesh[Axis.PP.value].get_local_rank()
        stage_ids = local_stage_ids(pp_rank, dims.pp, pcfg.pp_stages_per_rank)
        ranges = stage_layer_ranges(model_cfg.n_layers, n_stages, pcfg.pp_layers)
        parts = [split_model(whole, sid, ranges) for sid in stage_ids]
    else:
        stage_ids, parts = [0], [whole]
    ep_rank = mesh[Axis.EP.value].get_local_rank() if dims.ep > 1 else 0
    for part in parts:
        if dims.tp > 1:
            apply_tp(part, mesh[Axis.TP.value], pcfg.sequence_parallel)
        apply_ep(part, groups.ep, groups.dp)
        apply_ac(part, pcfg.activation_checkpoint, pcfg.ac_every)
        if pcfg.compile:
            apply_compile(part)
        # Materialised before FSDP so every shard is cut from the same full tensor with plain placements.
        materialize(part, model_cfg, seed, device, ep_rank, dims.ep)
        if pcfg.dp_mode == "fsdp" and dims.dp > 1:
            apply_fsdp(part, mesh[Axis.DP.value], mesh[Axis.EDP.value], bf16)
    return ParallelModel(parts=parts, stage_ids=stage_ids, n_stages=n_stages, dims=dims, mesh=mesh, groups=groups)


def attach_schedule(
    pm: ParallelModel, pcfg: ParallelConfig, device: torch.device, n_microbatches: int, loss_fn
) -> None:
    """Adds the pipeline schedule (pp > 1)."""
    if pm.dims.pp > 1:
        pm.schedule = build_schedule(
            pm.parts,
            pm.stage_ids,
            pm.n_stages,
            pm.mesh[Axis.PP.value],
            device,
            pcfg.pp_schedule,
            n_microbatches,
            loss_fn,
        )
