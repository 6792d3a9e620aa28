"""The planner against the real trainer on this CPU: activation memory of >= 6 layouts, step time of >= 8.

Memory: each layout trains a few steps under the allocation timeline (measure.py) on 1 or 2 gloo ranks; the
measured activation peak of a rank is the median over the profiled steps (a step in which gloo released a
tensor late would otherwise count it twice), compared with the prediction for its pipeline position. Model
state is compared to the byte: parameters, gradients and AdamW state.

Time: all runs happen in one group of 2 spawned ranks, one torch thread each, so both cores are busy in every
run. One-process runs ("solo": each rank trains the whole job alone) serve as references and calibration.
  1. calibration: the fixed costs per feature come from a small model (solo, tp2, tp2 with sequence
     parallelism, FSDP, pp2, ep2 at CAL_SMALL), the compute scale and the one-process costs from solo runs
     of the validation model at 1 and 4 micro-batches; the time model is fitted to these (cpu.calibrate),
     once;
  2. validation: the layouts below at the validation model, two at a time between solo reference runs of
     it (2 micro-batches); two more references bracket the calibration runs. A layout's measured time is
     scaled by the mean of the calibration's references over the mean of the two around it, so that a change
     in the machine's speed between the calibration and the layout cancels; on a steady machine the factor
     is 1.
The predicted time of each layout is compared with that; MAPE over the layouts, and whether the measured
fastest layout is among the three predicted fastest.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from moeyard.job.compose import compose
from moeyard.plan.calibration import Calibration
from moeyard.plan.cpu import calibrate, measure_rates
from moeyard.plan.measure import Job, run_layouts
from moeyard.plan.planner import Layout, Planner, layout_of, make_planner

MEMORY_WORKLOAD = (
    "model=debug",
    "train.seq_len=64",
    "train.batch_size=8",
    "train.micro_batches=2",
    "data.max_files=20",
    "train.steps=10",
    "cluster.gpu=cpu",
)
"""The debug model (4 blocks, 8 experts of width 32), 8 sequences of 64 tokens per step."""
MEMORY_LAYOUTS: dict[str, Layout] = {
    "single": Layout.single(micro_batches=2),
    "single full AC": Layout.single(micro_batches=2, ac="full"),
    "single selective AC": Layout.single(micro_batches=2, ac="selective"),
    "dp2": Layout.single(micro_batches=2, dp=2),
    "dp2 FSDP": Layout.single(micro_batches=2, dp=2, dp_mode="fsdp"),
    "ep2": Layout.single(micro_batches=2, dp=2, ep=2),
    "tp2": Layout.single(micro_batches=2, tp=2),
    "tp2 SP": Layout.single(micro_batches=2, tp=2, sp=True),
    "pp2 1F1B": Layout.single(micro_batches=2, pp=2),
    "pp2 GPipe": Layout.single(micro_batches=2, pp=2, schedule="gpipe"),
}
"""Name -> layout of the memory validation (MEMORY_WORKLOAD has 2 micro-batches)."""

TIME_WORKLOAD = (
    "model=debug",
    "model.dim=256",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.ffn_hidden=512",
    "moe.expert_hidden=512",
    "train.seq_len=128",
    "train.batch_size=8",
    "data.max_files=20",
    "train.steps=1000",
    "cluster.gpu=cpu",
    "cluster.gpus_per_node=2",
)
"""The time validation's model: 4 blocks of dim 256, 8 experts of width 512 (top-2), 8 x 128 tokens a step."""
CAL_SMALL = ("model.dim=64", "moe.expert_hidden=64", "model.ffn_hidden=128", "train.seq_len=32")
"""Overrides on TIME_WORKLOAD for the small model the per-feature fixed costs are fitted to."""
REFERENCE = Layout.single(micro_batches=2)
TIME_LAYOUTS: dict[str, tuple[bool, Layout]] = {
    "one process, full AC": (True, Layout.single(micro_batches=2, ac="full")),
    "dp2": (False, Layout.single(micro_batches=2, dp=2)),
    "dp2 m1": (False, Layout.single(micro_batches=1, dp=2)),
    "dp2 FSDP": (False, Layout.single(micro_batches=2, dp=2, dp_mode="fsdp")),
    "ep2": (False, Layout.single(micro_batches=2, dp=2, ep=2)),
    "ep2 selective AC": (False, Layout.single(micro_batches=2, dp=2, ep=2, ac="selective")),
    "tp2": (False, Layout.single(micro_batches=2, tp=2)),
    "tp2 SP": (False, Layout.single(micro_batches=2, tp=2, sp=True)),
    "pp2 1F1B": (False, Layout.single(micro_batches=2, pp=2)),
    "pp2 GPipe m4": (False, Layout.single(micro_batches=4, pp=2, schedule="gpipe")),
    "pp2 interleaved v2": (False, Layout.single(micro_batches=2, pp=2, schedule="interleaved_1f1b", vpp=2)),
}
"""Name -> (one process?, layout) of the time validation, on 2 ranks (a one-process job runs on each)."""
CAL_JOBS: dict[str, tuple[bool, Layout, tuple[str, ...]]] = {
    "small solo": (True, Layout.single(micro_batches=2), CAL_SMALL),
    "small tp2": (False, Layout.single(micro_batches=2, tp=2), CAL_SMALL),
    "small tp2 SP": (False, Layout.single(micro_batches=2, tp=2, sp=True), CAL_SMALL),
    "small FSDP": (False, Layout.single(micro_batches=2, dp=2, dp_mode="fsdp"), CAL_SMALL),
    "small pp2": (False, Layout.single(micro_batches=2, pp=2), CAL_SMALL),
    "small ep2": (False, Layout.single(micro_batches=2, dp=2, ep=2), CAL_SMALL),
    "solo m1": (True, Layout.single(micro_batches=1), ()),
    "solo m4": (True, Layout.single(micro_batches=4), ()),
}
"""Name -> (one process?, layout, model overrides) of the calibration jobs."""


@dataclass
class Row:
    name: str
    measured: float
    predicted: float
    detail: str = ""

    @property
    def error(self) -> float:
        return self.predicted / self.measured - 1


@dataclass
class MemoryReport:
    rows: list[Row] = field(default_factory=list)
    """Activation peak per layout and pipeline position (bytes)."""
    state: list[tuple[str, int, int]] = field(default_factory=list)
    """(layout, measured, predicted) model-state bytes of each rank."""


def memory_validation(steps: int = 3, layouts: dict | None = None) -> MemoryReport:
    """Measures and predicts the activation peak of each layout (module docstring)."""
    layouts = layouts or MEMORY_LAYOUTS
    report = MemoryReport()
    for world in sorted({layout.world for layout in layouts.values()}):
        names = [n for n, layout in layouts.items() if layout.world == world]
        overrides = {n: (*MEMORY_WORKLOAD, *layouts[n].overrides()) for n in names}
        jobs = [Job(n, overrides[n], memory_steps=steps) for n in names]
        for name, results in zip(names, run_layouts(jobs, world), strict=True):
            _memory_rows(report, name, overrides[name], world, results)
    return report


def _memory_rows(report: MemoryReport, name: str, overrides: tuple, world: int, results: list[dict]) -> None:
    failed = [r["error"] for r in results if "error" in r]
    if failed:
        raise RuntimeError(f"{name}: {failed[0]}")
    cfg = compose(list(overrides))
    planner = make_planner(cfg, measure=False)
    prediction = planner.predict(layout_of(cfg, world))
    per_pp: dict[int, list[float]] = {}
    stage = world // len(prediction.peaks)  # ranks per pipeline position
    for rank, result in enumerate(results):
        per_pp.setdefault(rank // stage, []).append(statistics.median(result["window_peaks"]))
        peak = prediction.peaks[rank // stage]
        m = result["memory"]
        report.state.append((name, m["params"] + m["grads"] + m["optimizer"], peak.model_state))
    for pp_rank, measured in sorted(per_pp.items()):
        peak = prediction.peaks[pp_rank]
        label = name if len(per_pp) == 1 else f"{name}, stage {pp_rank}"
        detail = f"saved {peak.activations} + working {peak.working} + buffers {peak.buffers}"
        report.rows.append(Row(label, max(measured), peak.activations + peak.working + peak.buffers, detail))


@dataclass
class TimeReport:
    rows: list[Row]
    calibration: Calibration
    references: list[float]
    idle: float
    """Fraction of the machine's CPU time that was idle over 2 s before the runs (other work's share)."""
    rates: dict
    """This CPU's measured rates (cpu.measure_rates)."""

    @property
    def mape(self) -> float:
        return statistics.fmean(abs(r.error) for r in self.rows)

    @property
    def best_measured(self) -> str:
        return min(self.rows, key=lambda r: r.measured).name

    @property
    def predicted_top3(self) -> list[str]:
        return [r.name for r in sorted(self.rows, key=lambda r: r.predicted)[:3]]


def time_validation(steps: int = 5, warmup: int = 2, layouts: dict | None = None) -> TimeReport:
    """Calibrates on CAL_JOBS and predicts each of TIME_LAYOUTS (module docstring)."""
    layouts = layouts or TIME_LAYOUTS
    idle = idle_fraction()
    rates = measure_rates()  # this run's own loopback and GEMM rates, not a cached measurement
    job = lambda name, solo, layout, model=(): Job(
        name, (*TIME_WORKLOAD, *model, *layout.overrides()), time_steps=steps, warmup=warmup, solo=solo
    )
    ref = job("reference", True, REFERENCE)
    # A reference run before and after the calibration jobs measures the machine's speed while the model was
    # fitted; every layout's time is scaled to that speed, so a machine that slows down (or speeds up) over the
    # minutes of the runs does not show up as prediction error.
    jobs = [ref, *(job(name, solo, layout, model) for name, (solo, layout, model) in CAL_JOBS.items())]
    for i, (name, (solo, layout)) in enumerate(layouts.items()):
        jobs += [ref] * (i % 2 == 0) + [job(name, solo, layout)]
    jobs.append(ref)
    measured = {}
    references = []
    for job, results in zip(jobs, run_layouts(jobs, 2), strict=True):
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise RuntimeError(f"{job.name}: {failed[0]}")
        seconds = max(r["step_s"] for r in results)
        if job.name == "reference":
            references.append(seconds)
        else:
            measured[job.name] = (seconds, len(references))
    cal = _calibrated(rates, measured)
    base = statistics.fmean(references[:2])  # the machine's speed during the calibration runs
    rows = []
    for name, (solo, layout) in layouts.items():
        seconds, after = measured[name]
        drift = base / statistics.fmean(references[after - 1 : after + 1])
        planner = planner_for(tuple(layout.overrides()), rates)
        planner.cal = cal
        prediction = planner.predict(layout_of(planner.cfg, 1 if solo else 2))
        t = prediction.time
        detail = (
            f"compute {t.compute:.3f} tp {t.tp:.3f} ep {t.ep:.3f} pp {t.pp:.3f} dp {t.dp:.3f} bubble {t.bubble:.3f}"
            f" other {t.optimizer + t.overhead:.3f}; measured {seconds:.3f} x drift {drift:.2f}"
        )
        rows.append(Row(name, seconds * drift, t.total, detail))
    return TimeReport(rows, cal, references, idle, rates)


def idle_fraction(seconds: float = 2.0) -> float:
    """The share of all cores' time spent idle over `seconds` (Linux /proc/stat; 1.0 where it is absent). A
    load average would still count the memory validation that ran just before."""

    def sample() -> tuple[int, int]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except OSError:
            return 0, 0
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / (total1 - total0) if total1 > total0 else 1.0


def planner_for(overrides: tuple[str, ...], rates: dict) -> Planner:
    """A planner for TIME_WORKLOAD plus `overrides`, on a CPU rank with the measured `rates`."""
    from moeyard.plan.planner import cpu_device

    planner = make_planner(compose([*TIME_WORKLOAD, *overrides]), measure=False)
    planner.device = cpu_device(2, measure=False).with_cpu_rates(rates)
    return planner


def _calibrated(rates: dict, measured: dict) -> Calibration:
    planners, runs = [], []
    for name, (solo, layout, model) in CAL_JOBS.items():
        planner = planner_for((*model, *layout.overrides()), rates)
        planners.append(planner)
        runs.append((layout_of(planner.cfg, 1 if solo else 2), measured[name][0]))
    return calibrate(planners, runs)
