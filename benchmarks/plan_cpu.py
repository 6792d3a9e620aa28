"""Calibrates `moeyard plan` to this CPU and checks it: the time and memory validations of the planner.

Measures this CPU's single-thread GEMM rate, copy bandwidth and gloo collectives over loopback, fits the time
model to calibration runs of the real trainer, predicts and measures the validation layouts (step time and
activation memory), prints both tables, and writes the fitted profile (device rates and calibration) as the
JSON that `moeyard plan cluster.gpu=cpu --calibration FILE` reads. What is run: plan/validation.py.

Run: .venv/bin/python benchmarks/plan_cpu.py [--out plan_cpu.json] [--steps N] [--no-memory] [--no-time]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moeyard.plan.cpu import profile_json
from moeyard.plan.validation import TIME_WORKLOAD, memory_validation, planner_for, time_validation

TIME_GOAL = 0.15
"""The time model's goal: what a planner ranking layouts needs when they differ by 30% or more."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the CPU profile JSON here")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (after 2 warmup)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    args = parser.parse_args(argv)
    if not args.no_time:
        report = time_validation(steps=args.steps)
        print(f"step time, {' '.join(TIME_WORKLOAD[:6])}; {report.idle:.0%} of the CPUs idle before the runs")
        print(f"calibration: {report.calibration}")
        print(f"{'layout':<22} {'measured s':>10} {'predicted s':>11} {'error':>7}")
        for r in report.rows:
            print(f"{r.name:<22} {r.measured:>10.3f} {r.predicted:>11.3f} {r.error:>+7.1%}")
        top3 = ", ".join(report.predicted_top3)
        print(f"MAPE {report.mape:.1%}; fastest measured {report.best_measured}; predicted top 3: {top3}")
        met = report.mape <= TIME_GOAL and report.best_measured in report.predicted_top3
        print(f"goal (MAPE <= {TIME_GOAL:.0%}, measured fastest in the predicted top 3): {'met' if met else 'missed'}")
        if args.out:
            planner = planner_for((), report.rates)
            args.out.write_text(json.dumps(profile_json(planner.device, report.calibration), indent=1))
            print(f"wrote {args.out}")
    if not args.no_memory:
        memory = memory_validation()
        print(f"\n{'layout':<24} {'measured MB':>12} {'predicted MB':>12} {'error':>7}")
        for r in memory.rows:
            print(f"{r.name:<24} {r.measured / 1e6:>12.3f} {r.predicted / 1e6:>12.3f} {r.error:>+7.1%}")
        exact = sum(m == p for _, m, p in memory.state)
        print(f"model state exact on {exact} of {len(memory.state)} ranks")


if __name__ == "__main__":
    main()
