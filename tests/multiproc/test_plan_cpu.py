"""The planner's memory predictions against the real trainer on this CPU (plan/validation.py).

Memory: ten layouts of the debug model on one process and on two gloo ranks (one process with none, full and
selective recomputation; dp2; dp2 FSDP; ep2; tp2; tp2 with sequence parallelism; pp2 1F1B; pp2 GPipe). Each
rank's peak activation memory, measured from the CPU allocator's events under torch's profiler, must be
within 10% of the prediction for its pipeline position, and its model state (parameters, gradients, AdamW
moments and step counters) equal to the prediction to the byte.

Step time is not asserted here: how close the time model comes is a measurement of this machine's speed over
minutes, so the project measures it in a benchmark, not a test. `benchmarks/plan_cpu.py` calibrates, predicts
and measures eleven layouts and prints the error of each against the goal (MAPE at most 15%, the measured
fastest among the three predicted fastest).

The table is printed (`pytest -s`) and written to the test's tmp_path. About 1 minute on 2 idle cores.
Run: .venv/bin/pytest -q -s tests/multiproc/test_plan_cpu.py
"""

from __future__ import annotations

import pytest

from moeyard.plan.validation import memory_validation

pytestmark = pytest.mark.multiproc

MEMORY_GOAL = 0.10


def test_activation_memory_and_model_state(tmp_path):
    report = memory_validation()
    lines = [f"{'layout':<24} {'measured MB':>12} {'predicted MB':>12} {'error':>7}  predicted parts (bytes)"]
    for r in report.rows:
        lines.append(f"{r.name:<24} {r.measured / 1e6:>12.3f} {r.predicted / 1e6:>12.3f} {r.error:>+7.1%}  {r.detail}")
    lines.append(f"model state: {sum(m == p for _, m, p in report.state)} of {len(report.state)} ranks exact")
    text = "\n".join(lines)
    print("\n" + text)
    (tmp_path / "memory.txt").write_text(text + "\n")
    assert len({r.name.split(",")[0] for r in report.rows}) >= 6
    for name, measured, predicted in report.state:
        assert measured == predicted, f"{name}: model state {measured} B measured, {predicted} B predicted"
    for r in report.rows:
        assert abs(r.error) <= MEMORY_GOAL, f"{r.name}: {r.error:+.1%} ({r.measured} B measured)"
