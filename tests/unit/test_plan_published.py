"""Published MoE training runs predicted on paper, beside their published throughput (launch/plan/published.py).

DeepSeek-V3 on 2,048 H800 (PP16 DualPipe, EP64, ZeRO-1), Mixtral-8x7B on 64 H100 (Megatron-Core, TP1 EP8
PP4), Qwen3-30B-A3B on 16 H100 (Megatron-Bridge, TP1 PP2 EP8): the planner predicts each published layout on
its cluster with the stated device tables and efficiencies (no calibration to these runs), and the ratio of
predicted to published tokens/s per GPU is printed and written to a table. Each published layout is among the
layouts `moeyard plan` enumerates for its job (Qwen3's VP24 included); where the planner ranks them is
`python -m moeyard.plan.published` (a whole plan each, minutes: docs/planner.md has the table).
The goal is within 20%; a run that misses it is listed in KNOWN_MISSES with the reason, and the test
insists it still misses, so an improvement of the model moves it out of the list rather than hiding in a
looser bound.

Run: .venv/bin/pytest -q -s tests/unit/test_plan_published.py
"""

from __future__ import annotations

from moeyard.plan.published import RUNS, compare, table

GOAL = 0.20
KNOWN_MISSES = {
    "DeepSeek-V3, 2048 H800": (
        "over-predicted: the model runs DeepSeek's FP8 linear layers at the GEMM efficiency of bf16 (70% of the "
        "FP8 peak, as DeepGEMM's published rates) and hides the all-to-all wholly behind DualPipe; the report's "
        "180K GPU hours per trillion tokens come to about two thirds of that"
    ),
}


def test_published_layouts_against_published_throughput(tmp_path):
    comparisons = [compare(run) for run in RUNS]
    text = table(comparisons)
    print("\n" + text)
    (tmp_path / "published.txt").write_text(text + "\n")
    for c in comparisons:
        assert c.enumerated, f"{c.run.name}: `moeyard plan` does not list {c.prediction.layout.label()}"
        within = abs(c.ratio - 1) <= GOAL
        if c.run.name in KNOWN_MISSES:
            assert not within, f"{c.run.name} now within {GOAL:.0%} (ratio {c.ratio:.2f}): take it off KNOWN_MISSES"
        else:
            assert within, f"{c.run.name}: predicted / published = {c.ratio:.2f}"
