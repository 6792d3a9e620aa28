"""How `moeyard plan` orders its predictions, and which it recommends.

Three classes, in this order: layouts predicted to leave `cluster.memory_margin` of usable memory free (the
only ones recommended), layouts that fit but inside the margin ("tight": a few percent of memory model error,
a longer sequence or a less balanced router from failing), and layouts that do not fit (least over first).

Within the first class the fastest predicted step sets the bar, and every layout within TIME_ERROR of it is a
tie: the time model cannot tell them apart, so the prediction alone should not pick among them. Ties come
first, ordered by memory headroom (compared in steps of MEMORY_ERROR, the memory model's own error), then by
simplicity (`simplicity`), then by predicted time; the other layouts of the class follow, fastest first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moeyard.plan.planner import Layout, Prediction

TIME_ERROR = 0.15
"""The time model's error: the goal its validation holds it to (MAPE at most 15%, benchmarks/plan_cpu.py;
docs/planner.md measured 12.7% on CPU, and 0.89 and 0.92 of the published Mixtral and Qwen3 throughputs)."""
MEMORY_ERROR = 0.05
"""The memory model's error as a share of the memory predicted: its validation's worst, +3.8% (docs/planner.md),
rounded up. Headrooms closer than this are equal when ties are broken."""

OK, TIGHT, NO_FIT = "yes", "tight", "NO"
"""A layout's class, as the table's `fits` column shows it."""

_AC_COST = {"none": 0, "selective": 1, "full": 2}
_DP_COST = {"replicate": 0, "zero1": 1, "zero2": 2, "fsdp": 3}
"""Fewer collectives and less sharded state first: ZeRO-1 adds an all-gather, ZeRO-2 shards gradients through
FSDP, FSDP gathers again in backward."""


def fit_class(p: Prediction, margin: float) -> str:
    """OK when the worst rank leaves `margin` of usable memory free, TIGHT when it fits without, else NO_FIT."""
    if p.headroom >= margin:
        return OK
    return TIGHT if p.fits else NO_FIT


def simplicity(layout: Layout) -> tuple[int, int, bool, int]:
    """Smaller is simpler: the parallel degrees in use (of tp, pp, ep, dp: each one more kind of collective
    to go wrong or wait on), then pipeline stages per pipeline (pp x virtual stages: fewer sends and a
    schedule with fewer steps), then replicated, ZeRO-1, ZeRO-2, FSDP in that order (`_DP_COST`), then less
    recomputation."""
    used = sum(d > 1 for d in (layout.tp, layout.pp, layout.cp, layout.ep, layout.dp))
    return used, layout.pp * layout.vpp, _DP_COST[layout.dp_mode], _AC_COST[layout.ac]


@dataclass(frozen=True)
class Ranking:
    """Predictions in the order above; the first `ties` are the tie group (none when nothing is recommended)."""

    predictions: list[Prediction]
    ties: int
    margin: float
    best_s: float | None
    """The fastest recommended step, the tie group's bar (None when no layout leaves the margin)."""


def rank(predictions: list[Prediction], margin: float) -> Ranking:
    """`predictions` ordered as the module docstring says."""
    classes = {OK: [], TIGHT: [], NO_FIT: []}
    for p in predictions:
        classes[fit_class(p, margin)].append(p)
    ok = sorted(classes[OK], key=lambda p: p.time.total)
    best = ok[0].time.total if ok else None
    ties = [p for p in ok if best is not None and p.time.total <= best * (1 + TIME_ERROR)]
    ties.sort(key=lambda p: (-math.floor(p.headroom / MEMORY_ERROR), simplicity(p.layout), p.time.total))
    rest = ok[len(ties) :]
    tight = sorted(classes[TIGHT], key=lambda p: p.time.total)
    over = sorted(classes[NO_FIT], key=lambda p: p.worst.total)
    return Ranking(ties + rest + tight + over, len(ties), margin, best)
