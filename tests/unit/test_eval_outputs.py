"""Pipeline eval as the trainer runs it (`schedule.eval(..., return_outputs=False)`): on this torch the
schedules take the flag through eval, keep no micro-batch's output for the caller (nothing merged, nothing
returned) and still give every micro-batch's loss, equal to the loss of that micro-batch computed directly.
Run: .venv/bin/pytest -q tests/unit/test_eval_outputs.py
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

from moeyard.parallel import compat

MICRO_BATCHES = 4


@pytest.fixture
def one_rank_group():
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@pytest.mark.parametrize("schedule_cls", [ScheduleGPipe, Schedule1F1B], ids=["gpipe", "1f1b"])
@torch.no_grad()
def test_eval_returns_no_outputs_and_every_micro_batch_loss(one_rank_group, schedule_cls) -> None:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    x, y = torch.randn(MICRO_BATCHES * 2, 3, 4), torch.randn(MICRO_BATCHES * 2, 3, 4)
    meta = torch.empty(2, 3, 4, device="meta")
    stage = compat.pipeline_stage(
        module,
        0,
        1,
        torch.device("cpu"),
        input_args=meta,
        output_args=meta,
        input_grads=(meta,),
        output_grads=(meta,),
        group=one_rank_group,
    )
    loss_fn = torch.nn.functional.mse_loss
    schedule = schedule_cls(stage, n_microbatches=MICRO_BATCHES, loss_fn=loss_fn)
    losses: list[torch.Tensor] = []
    returned = schedule.eval(x, target=y, losses=losses, return_outputs=False)
    assert returned is None
    assert stage.output_chunks == []  # no output kept for a merge
    want = [loss_fn(module(xm), ym) for xm, ym in zip(x.chunk(MICRO_BATCHES), y.chunk(MICRO_BATCHES), strict=True)]
    assert len(losses) == MICRO_BATCHES
    for got, expected in zip(losses, want, strict=True):
        assert torch.equal(got, expected)
