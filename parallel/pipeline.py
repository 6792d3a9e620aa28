"""Pipeline parallelism with torch.distributed.pipelining: manual stage split and the schedules.

Stages are whole blocks. A stage keeps the blocks of its range (names unchanged), the embedding only on the
first stage, the final norm and output only on the last. Interleaved 1F1B gives each rank several stages,
rank r holding stages r, r + pp, r + 2*pp, ... (the "loop" placement the schedule expects).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
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
    stage = copy.deepcopy(model)
    for lid in list(stage.layers.keys()):
        if not start <= int(lid) < end:
            del stage.layers[lid]
    if stage_id != 0:
        stage.tok_embeddings = None
    if stage_id != len(ranges) - 1:
        stage.norm = None
        stage.output = None
    return stage


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
        if self.tp_mesh is None:
            return self._meta((self.micro_rows, self.seq_len, self.vocab_size), self.logits_dtype)
        tp = self.tp_mesh.size()
        local = self._meta((self.micro_rows, self.seq_len, self.vocab_size // tp), self.logits_dtype)
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
