"""The planner's memory and time predictions against the real trainer on this CPU (launch/plan/validation.py).

Memory: ten layouts of the debug model on one process and on two gloo ranks (one process with none, full and
selective recomputation; dp2; dp2 FSDP; ep2; tp2; tp2 with sequence parallelism; pp2 1F1B; pp2 GPipe). Each
rank's peak activation memory, measured from the CPU allocator's events under torch's profiler, must be
within 10% of the prediction for its pipeline position, and its model state (parameters, gradients, AdamW
moments and step counters) equal to the prediction to the byte.

Time: after a one-off calibration on other runs (a smaller model for the fixed costs of each kind of
parallelism, and one-process runs at other micro-batch counts), eleven layouts of a larger model on two
ranks are predicted and measured: the mean absolute percentage error must be at most 15%, and the measured
fastest layout must be among the three predicted fastest. On a machine where other work already takes more
than a fifth of the CPUs before the runs, step times swing by 20-30% from run to run: the table is printed
and the time assertions are skipped.

Both tables are printed (`pytest -s`) and written to the test's tmp_path. About 3 minutes on 2 idle cores.
Run: .venv/bin/pytest -q -s tests/multiproc/test_plan_cpu.py
"""

from __future__ import annotations

import pytest

from moeyard.plan.validation import memory_validation, time_validation

pytestmark = pytest.mark.multiproc

MEMORY_GOAL = 0.10
TIME_GOAL = 0.15
QUIET = 0.8
"""Idle share of the CPUs before the time runs below which other work makes step times incomparable."""


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


def test_step_time(tmp_path):
    report = time_validation()
    lines = [f"calibration: {report.calibration}", f"idle before the runs: {report.idle:.0%} of the CPUs"]
    lines.append(f"{'layout':<22} {'measured s':>10} {'predicted s':>11} {'error':>7}  predicted parts")
    for r in report.rows:
        lines.append(f"{r.name:<22} {r.measured:>10.3f} {r.predicted:>11.3f} {r.error:>+7.1%}  {r.detail}")
    top3 = ", ".join(report.predicted_top3)
    lines.append(f"MAPE {report.mape:.1%}; measured fastest: {report.best_measured}; predicted top 3: {top3}")
    text = "\n".join(lines)
    print("\n" + text)
    (tmp_path / "time.txt").write_text(text + "\n")
    assert len(report.rows) >= 8
    if report.idle < QUIET:
        pytest.skip(f"only {report.idle:.0%} of the CPUs idle before the runs: not a quiet machine")
    assert report.mape <= TIME_GOAL, f"MAPE {report.mape:.1%}"
    assert report.best_measured in report.predicted_top3
