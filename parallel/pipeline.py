"""Pipeline parallelism with torch.distributed.pipelining: manual stage split and the schedules.

Stages are whole blocks. A stage keeps the blocks of its range (names unchanged), the embedding only on the
first stage, the final norm and output only on the last. Interleaved 1F1B gives each rank several stages,
rank r holding stages r, r + pp, r + 2*pp, ... (the "loop" placement the schedule expects).

Multi-token prediction (model.mtp_layers) runs on the last stage, not on a stage of its own: its modules
need the main model's last hidden state and the output head, which the last stage already holds, so only
the embedding is held twice (first and last stage; the copies start equal, `sum_shared_embedding_grads`
sums their gradients and the grad norm counts one). A stage of its own would receive the hidden state and
need a third copy of both the embedding and the head. The MTP blocks add to the last stage's work:
parallel.pp_layers can give it fewer main blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    _PipelineSchedule,
)
from torch.distributed.tensor import DTensor, Shard

from moeyard.moe.model import Transformer
from moeyard.parallel.compat import pipeline_stage

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}


def stage_layer_ranges(n_layers: int, n_stages: int, layers_per_stage: list[int]) -> list[tuple[int, int]]:
    """[start, end) layer ids per stage: the given counts, or as even as possible (earlier stages larger)."""
    counts = list(layers_per_stage) or [n_layers // n_stages + (i < n_layers % n_stages) for i in range(n_stages)]
    ends = torch.tensor(counts).cumsum(0).tolist()
    return [(end - n, end) for n, end in zip(counts, ends, strict=True)]


def local_stage_ids(pp_rank: int, pp: int, stages_per_rank: int) -> list[int]:
    return [pp_rank + k * pp for k in range(stages_per_rank)]


def split_model(model: Transformer, stage_id: int, ranges: list[tuple[int, int]]) -> Transformer:
    """A copy of `model` (normally on the meta device) holding only stage `stage_id`'s parts."""
    start, end = ranges[stage_id]
    last = stage_id == len(ranges) - 1
    stage = copy.deepcopy(model)
    for lid in list(stage.layers.keys()):
        keep = last if lid in stage.mtp else start <= int(lid) < end
        if not keep:
            del stage.layers[lid]
    if stage_id != 0 and not (last and stage.mtp):  # the MTP modules embed tokens too
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
        for lid in list(stage.mtp.keys()):
            del stage.mtp[lid]
    return stage


def embedding_group(mesh: DeviceMesh, pp_axis: str) -> dist.ProcessGroup | None:
    """Under model.mtp_layers: this rank's group of the first and last pipeline stage's ranks, which both
    hold the embedding (the pp group itself when pp = 2). Every rank builds every such group (new_group is
    collective) and keeps its own; None on the ranks of neither."""
    pp_dim = mesh.mesh_dim_names.index(pp_axis)
    lines = mesh.mesh.movedim(pp_dim, -1).reshape(-1, mesh.size(pp_dim)).tolist()
    if len(lines[0]) == 2:
        return mesh[pp_axis].get_group()
    mine = None
    for line in lines:
        group = dist.new_group([line[0], line[-1]])
        if dist.get_rank() in (line[0], line[-1]):
            mine = group
    return mine


@torch.no_grad()
def sum_shared_embedding_grads(
    parts: list[Transformer], stage_ids: list[int], n_stages: int, group: dist.ProcessGroup | None
) -> None:
    """Sums the embedding's gradient over its copies on the first and last stage (model.mtp_layers with
    pp > 1), so both take the same update; no-op elsewhere."""
    if group is None:
        return
    holders = [p for p, sid in zip(parts, stage_ids, strict=True) if sid in (0, n_stages - 1)]
    for part in holders:
        grad = part.tok_embeddings.weight.grad
        dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=group)


def shared_embedding(
    named_params: list[tuple[str, torch.nn.Parameter]], has_first_stage: bool
) -> tuple[list[tuple[str, torch.nn.Parameter]], list[torch.nn.Parameter]]:
    """(the parameters the grad norm counts, those it must not count but clip scales too): the last stage's
    copy of the embedding (model.mtp_layers with pp > 1) is the first stage's, counted there once."""
    if has_first_stage:
        return named_params, []
    copies = [p for name, p in named_params if name == "tok_embeddings.weight"]
    return [(n, p) for n, p in named_params if n != "tok_embeddings.weight"], copies


@dataclass(frozen=True)
class StageShapes:
    """What crosses a stage boundary for one micro-batch, declared so that no stage has to run a forward on
    placeholder data to find out (which would route every placeholder token to the same experts)."""

    micro_rows: int
    """Sequences per micro-batch on this rank."""
    seq_len: int
    dim: int
    vocab_size: int
    hidden_dtype: torch.dtype
    """The residual stream's dtype between blocks (bf16 when FSDP casts parameters to bf16)."""
    logits_dtype: torch.dtype = torch.float32
    """The last stage's output dtype: bf16 under bf16 autocast or bf16 parameters (torch 2.11 checks a stage's
    outputs against what it declares)."""
    tp_mesh: DeviceMesh | None = None
    """With tp > 1 the logits are vocab-sharded DTensors."""
    sequence_parallel: bool = False
    """With tp > 1 and sequence parallelism, blocks pass on a 1/tp slice of the sequence."""
    mtp_layers: int = 0
    """The last stage's logits hold the main and each MTP module's sequence, one after another."""

    def _meta(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # Floating tensors carry gradients across the boundary: the schedule derives the backward's
        # buffers from requires_grad.
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)

    def inputs(self, stage_id: int) -> torch.Tensor:
        if stage_id == 0:
            return self._meta((self.micro_rows, self.seq_len), torch.long)
        return self.hidden()

    def outputs(self, stage_id: int, n_stages: int) -> torch.Tensor:
        if stage_id < n_stages - 1:
            return self.hidden()
        seq = self.seq_len * (1 + self.mtp_layers)
        if self.tp_mesh is None:
            return self._meta((self.micro_rows, seq, self.vocab_size), self.logits_dtype)
        tp = self.tp_mesh.size()
        local = self._meta((self.micro_rows, seq, self.vocab_size // tp), self.logits_dtype)
        return DTensor.from_local(local, self.tp_mesh, [Shard(-1)], run_check=False)

    def input_grads(self, stage_id: int) -> tuple[torch.Tensor | None]:
        """What backward sends to the previous stage (nothing from the first: token ids have no gradient)."""
        return (None,) if stage_id == 0 else (self.hidden(),)

    def output_grads(self, stage_id: int, n_stages: int) -> tuple[torch.Tensor]:
        """What backward receives from the next stage (the last stage's comes from its loss)."""
        return (self.outputs(stage_id, n_stages),)

    def hidden(self) -> torch.Tensor:
        tp = self.tp_mesh.size() if self.tp_mesh is not None else 1
        seq = self.seq_len // tp if self.sequence_parallel else self.seq_len
        return self._meta((self.micro_rows, seq, self.dim), self.hidden_dtype)


def build_schedule(
    stages: list[torch.nn.Module],
    stage_ids: list[int],
    n_stages: int,
    pp_mesh: DeviceMesh,
    device: torch.device,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shapes: StageShapes,
) -> _PipelineSchedule:
    """Wraps each local stage module with its declared input and output shapes and builds the configured
    schedule (gradients scaled by 1/n_microbatches)."""
    pipe_stages = [
        pipeline_stage(
            module,
            sid,
            n_stages,
            device,
            input_args=shapes.inputs(sid),
            output_args=shapes.outputs(sid, n_stages),
            # With DTensor logits (tp > 1) torch 2.13's schedule needs the gradients declared to stay static.
            input_grads=shapes.input_grads(sid),
            output_grads=shapes.output_grads(sid, n_stages),
            group=pp_mesh.get_group(),
        )
        for module, sid in zip(stages, stage_ids, strict=True)
    ]
    cls = SCHEDULES[schedule]
    if schedule == "interleaved_1f1b":
        return cls(pipe_stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)
    return cls(pipe_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)
