"""Pipeline parallelism with torch.distributed.pipelining: manual stage split and the schedules.

Stages are whole blocks. A stage keeps the blocks of its range (names unchanged), the embedding only on the
first stage, the final norm and output only on the last. Interleaved 1F1B gives each rank several stages,
rank r holding stages r, r + pp, r + 2*pp, ... (the "loop" placement the schedule expects).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    _PipelineSchedule,
)

from moe.model import Transformer

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


def build_schedule(
    stages: list[torch.nn.Module],
    stage_ids: list[int],
    n_stages: int,
    pp_mesh: DeviceMesh,
    device: torch.device,
    schedule: str,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> _PipelineSchedule:
    """Wraps each local stage module and builds the configured schedule (gradients scaled by 1/n_microbatches)."""
    pipe_stages = [
        PipelineStage(module, sid, n_stages, device, group=pp_mesh.get_group())
        for module, sid in zip(stages, stage_ids, strict=True)
    ]
    cls = SCHEDULES[schedule]
    if schedule == "interleaved_1f1b":
        return cls(pipe_stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)
    return cls(pipe_stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=True)
