"""Builds this rank's part of the model: split into pipeline stages, then TP -> EP -> AC -> compile ->
DP, one small `apply_*` step each (as torchtitan orders them), all on the meta device; only then are this
rank's local shards allocated and filled (or left for a checkpoint to fill).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining.schedules import _PipelineSchedule

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.experts import GroupedExperts
from moeyard.moe.init import init_slice_
from moeyard.moe.layer import MoELayer
from moeyard.moe.model import Transformer
from moeyard.parallel.config import ParallelConfig, uses_fsdp
from moeyard.parallel.context import ContextShard, apply_cp
from moeyard.parallel.data_parallel import apply_fsdp, clean_fqn
from moeyard.parallel.dims import Axis, ParallelDims
from moeyard.parallel.expert import apply_ep
from moeyard.parallel.pipeline import (
    StageShapes,
    build_schedule,
    embedding_group,
    local_stage_ids,
    split_model,
    stage_layer_ranges,
)
from moeyard.parallel.shards import shard_extent
from moeyard.parallel.tensor import apply_tp


@dataclass
class Groups:
    """Process groups of this rank (None where the axis has size 1 or there is no mesh)."""

    dp: dist.ProcessGroup | None = None
    edp: dist.ProcessGroup | None = None
    ep: dist.ProcessGroup | None = None
    pp: dist.ProcessGroup | None = None
    tp: dist.ProcessGroup | None = None
    batch: dist.ProcessGroup | None = None
    """The dp x cp x tp ranks holding tokens of one micro-batch (MoE balancing counts are summed over them)."""
    cp: dist.ProcessGroup | None = None
    """The ranks holding positions of the same rows (attention gathers keys and values over them)."""
    sequence: dist.ProcessGroup | None = None
    """The cp x tp ranks each routing a slice of the same rows (tp alone without context parallelism)."""
    embedding: dist.ProcessGroup | None = None
    """model.mtp_layers with pp > 1: the first and last stage's ranks, both holding the embedding."""

    @classmethod
    def from_mesh(
        cls,
        mesh: DeviceMesh | None,
        expert_mesh: DeviceMesh | None,
        dims: ParallelDims,
        context_mesh: DeviceMesh | None = None,
    ) -> Groups:
        if mesh is None or expert_mesh is None:
            return cls()
        pick = lambda m, axis, size: m[axis.value].get_group() if size > 1 else None
        tp = pick(mesh, Axis.TP, dims.tp)
        cp_tp = (Axis.CP.value, Axis.TP.value)
        return cls(
            dp=pick(mesh, Axis.DP, dims.dp_cp),
            edp=pick(expert_mesh, Axis.EDP, dims.edp),
            ep=pick(expert_mesh, Axis.EP, dims.ep),
            pp=pick(mesh, Axis.PP, dims.pp),
            tp=tp,
            batch=ParallelDims.batch_mesh(mesh).get_group() if dims.dp_cp * dims.tp > 1 else None,
            cp=pick(context_mesh, Axis.CP, dims.cp),
            sequence=context_mesh[cp_tp]._flatten("sequence").get_group() if dims.cp > 1 else tp,
        )


@dataclass
class ParallelModel:
    """The model parts this rank holds and how to drive them."""

    parts: list[Transformer]
    stage_ids: list[int]
    n_stages: int
    dims: ParallelDims
    mesh: DeviceMesh | None
    """Dense layers' mesh (pp, dp, tp), its dp axis dp x cp ranks; None in one process."""
    expert_mesh: DeviceMesh | None
    """Experts' mesh (pp, edp, ep) over the same ranks; None in one process."""
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


@torch.no_grad()
def init_local_shards(
    part: Transformer, cfg: ModelConfig, seed: int, dims: ParallelDims, expert_mesh: DeviceMesh | None
) -> None:
    """Fills each allocated local shard with its slice of one process's initial weights (no full tensors)."""
    for fqn, param in part.named_parameters():
        name = clean_fqn(fqn)
        shape, offset, local = shard_extent(name, param, dims, expert_mesh)
        init_slice_(local, name, shape, offset, cfg, seed)
    for moe in part.moe_layers().values():
        moe.router.expert_bias.zero_()


@torch.no_grad()
def params_to_bf16(part: Transformer) -> None:
    """parallel.param_dtype=bf16: the module's parameters in bf16, rounded from their fp32 initial values
    (the fp32 masters live in the optimizer, parallel/zero.py); buffers (rotary tables, expert biases) stay
    fp32. A tied weight stays one parameter."""
    done: dict[int, torch.nn.Parameter] = {}
    for module in part.modules():
        for key, param in module._parameters.items():
            if param is not None and param.is_floating_point():
                if id(param) not in done:
                    done[id(param)] = torch.nn.Parameter(param.to(torch.bfloat16), param.requires_grad)
                module._parameters[key] = done[id(param)]


def apply_ac(part: Transformer, mode: str, every: int) -> None:
    """Activation checkpointing of whole blocks: all (full) or every k-th (selective)."""
    if mode == "none":
        return
    for lid in list(part.layers.keys()):
        if mode == "full" or int(lid) % every == 0:
            part.layers[lid] = checkpoint_wrapper(part.layers[lid], preserve_rng_state=False)


def trace_expert_counts(parts: list[Transformer]) -> None:
    """Where experts run the per-expert loop (moe/experts.py), which reads its counts on the host
    (`.tolist()`), compiled blocks trace those reads as symbolic sizes instead of a graph break that would
    split the block (and leave it uncompiled under a checkpoint); torchtitan sets the same for MoE. Only
    then: the dynamo setting is process-wide, read when a block is traced, and it changes how inductor fuses
    blocks that do not need it (a grouped_mm run would round differently from one process's reference)."""
    if any(isinstance(m, GroupedExperts) and not m.use_grouped_mm for part in parts for m in part.modules()):
        torch._dynamo.config.capture_scalar_outputs = True


def apply_compile(part: Transformer) -> None:
    """Compiles each block in place (repeated blocks share one compiled graph).

    Under activation checkpointing the block inside the checkpoint is compiled, not the wrapper: compiled
    from outside, the checkpoint becomes a higher-order op whose body may not mutate modules (the MoE
    layer hands out its routing statistics), and one such break leaves the whole block uncompiled.
    """
    trace_expert_counts([part])
    for block in part.layers.values():
        getattr(block, "_checkpoint_wrapped_module", block).compile()


def build_parallel_model(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    mesh: DeviceMesh | None,
    expert_mesh: DeviceMesh | None,
    device: torch.device,
    seed: int,
    bf16: bool = False,
    init: bool = True,
    context_mesh: DeviceMesh | None = None,
    seq_len: int = 0,
) -> ParallelModel:
    """This rank's model parts, sharded and initialised identically to one process's model.

    init=False allocates the shards without filling them, for a checkpoint load to overwrite. Under context
    parallelism `context_mesh` (`ParallelDims.build_context_mesh`) names the cp groups and every row holds
    `seq_len` tokens.
    """
    groups = Groups.from_mesh(mesh, expert_mesh, dims, context_mesh)
    shard = ContextShard(groups.cp, seq_len, device) if groups.cp is not None else None
    with torch.device("meta"):
        whole = Transformer(model_cfg, moe_cfg)
    n_stages = dims.pp * pcfg.pp_stages_per_rank
    if dims.pp > 1:
        pp_rank = mesh[Axis.PP.value].get_local_rank()
        stage_ids = local_stage_ids(pp_rank, dims.pp, pcfg.pp_stages_per_rank)
        ranges = stage_layer_ranges(model_cfg.n_layers, n_stages, pcfg.pp_layers)
        parts = [split_model(whole, sid, ranges) for sid in stage_ids]
        if model_cfg.mtp_layers:
            groups.embedding = embedding_group(mesh, Axis.PP.value)
    else:
        stage_ids, parts = [0], [whole]
    for part in parts:
        if dims.tp > 1:
            apply_tp(part, mesh[Axis.TP.value], pcfg.sequence_parallel)
        apply_ep(part, groups.ep, groups.batch, groups.sequence, pcfg.ep_overlap, pcfg.ep_chunks, dims.tp)
        apply_cp(part, shard)
        apply_ac(part, pcfg.activation_checkpoint, pcfg.ac_every)
        if pcfg.compile:
            apply_compile(part)
        if uses_fsdp(pcfg.dp_mode, dims.dp_cp):
            zero2 = pcfg.dp_mode == "zero2"
            apply_fsdp(part, mesh[Axis.DP.value], expert_mesh[Axis.EDP.value], bf16, reshard_after_forward=not zero2)
        part.to_empty(device=device)  # the first real allocation: local shards only
        if model_cfg.tie_embeddings and part.output is not None and part.tok_embeddings is not None:
            part.output.weight = part.tok_embeddings.weight  # to_empty gave each module its own new tensor
        if init:
            init_local_shards(part, model_cfg, seed, dims, expert_mesh)
        if pcfg.param_dtype == "bf16" and not uses_fsdp(pcfg.dp_mode, dims.dp_cp):
            params_to_bf16(part)
        part.reset_buffers(device)
    return ParallelModel(
        parts=parts,
        stage_ids=stage_ids,
        n_stages=n_stages,
        dims=dims,
        mesh=mesh,
        expert_mesh=expert_mesh,
        groups=groups,
    )


def attach_schedule(
    pm: ParallelModel,
    pcfg: ParallelConfig,
    device: torch.device,
    n_microbatches: int,
    loss_fn,
    shapes: StageShapes,
) -> None:
    """Adds the pipeline schedule (pp > 1), its stages built with the declared `shapes`."""
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
            shapes,
        )
