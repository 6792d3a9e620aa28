"""The planner's last pipeline stage holds only the logits in flight, not every micro-batch's.

The trainer asks torch's schedule for no outputs (`return_outputs=False`), so the last stage frees a
micro-batch's logits after its backward. Under 1F1B it holds one micro-batch's, however many the step has;
under GPipe, all of them (every forward runs before the first backward).

    .venv/bin/pytest -q tests/unit/test_plan_pipeline_logits.py
"""

from __future__ import annotations

import pytest

from moeyard.job.compose import compose
from moeyard.parallel.dims import ParallelDims
from moeyard.parallel.memory import RankMemory
from moeyard.plan.activations import FP32, Shape
from moeyard.plan.memory import rank_peak

VOCAB = 151_936  # Qwen3's: [T, V] logits dwarf everything else a stage keeps
STATE = RankMemory(params=0, gathered_root=0, gathered_block=0, bf16=False)


def _last_stage_buffers(schedule: str, micro: int) -> int:
    cfg = compose(["model=debug", f"model.vocab_size={VOCAB}", "parallel.pp=2", f"parallel.pp_schedule={schedule}"])
    dims = ParallelDims.from_config(cfg.parallel, 2)
    shape = Shape(rows=1, seq=64)
    peak = rank_peak(cfg.model, cfg.moe, cfg.parallel, dims, shape, micro, pp_rank=1, state=STATE)
    return peak.buffers


@pytest.mark.parametrize(("schedule", "logits_in_flight"), [("1f1b", lambda m: 1), ("gpipe", lambda m: m)])
def test_last_stage_keeps_only_the_logits_in_flight(schedule: str, logits_in_flight) -> None:
    cfg = compose(["model=debug"])
    hidden = 64 * cfg.model.dim * FP32  # one micro-batch's [1, 64, D] fp32 boundary tensor
    logits = 64 * VOCAB * FP32
    grown = _last_stage_buffers(schedule, 8) - _last_stage_buffers(schedule, 4)
    # Four more micro-batches add four receive buffers, and the logits the schedule then has in flight.
    assert grown == 4 * hidden + (logits_in_flight(8) - logits_in_flight(4)) * logits
