"""`moeyard plan [overrides] [--json] [--calibration FILE] [--top N]`: the ranked table of layouts."""

from __future__ import annotations

import argparse
import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from moeyard.job.compose import compose
from moeyard.job.schema import ConfigError
from moeyard.moe.config import check_fields
from moeyard.plan.cluster import check_cluster, planned_cluster
from moeyard.plan.layouts import PlanResult, plan
from moeyard.plan.planner import Prediction, layout_of
from moeyard.plan.ranking import OK, TIME_ERROR

GB = 1e9

HEADER = (
    f"{'#':>4}  {'layout':<42} {'fits':>5} {'free':>4} {'peak GB':>8} {'state':>6} {'act':>6} {'work':>5} {'buf':>5} |"
    f" {'step s':>8} {'comp':>7} {'tp':>6} {'ep':>6} {'pp':>6} {'dp':>6} {'bubble':>6} {'other':>6} |"
    f" {'tokens/s':>10} {'MFU':>6}"
)


def row(i: int, p: Prediction, fits: str) -> str:
    w, t = p.worst, p.time
    act = w.activations
    free = f"{p.headroom:.0%}" if p.fits else "-"
    return (
        f"{i:>4}  {p.layout.label():<42} {fits:>5} {free:>4} {w.total / GB:>8.1f}"
        f" {w.model_state / GB:>6.1f} {act / GB:>6.1f} {w.working / GB:>5.1f} {w.buffers / GB:>5.1f} |"
        f" {t.total:>8.3f} {t.compute:>7.3f} {t.tp:>6.3f} {t.ep:>6.3f} {t.pp:>6.3f} {t.dp:>6.3f}"
        f" {t.bubble:>6.3f} {t.optimizer + t.overhead:>6.3f} | {p.tokens_per_s:>10.0f} {p.mfu:>6.1%}"
    )


def render(result: PlanResult, top: int) -> str:
    pl = result.planner
    cfg, d = pl.cfg, pl.device
    fits = sum(p.fits for p in result.predictions)
    dtype = "bf16" if pl.bf16 else "fp32"
    margin = result.ranking.margin
    lines = [
        f"moeyard plan: {cfg.model.name} on {result.nodes} node(s) x {pl.per_node} {d.name} ({result.world} ranks);"
        f" {cfg.train.batch_size} sequences x {cfg.train.seq_len} tokens per step, {dtype}",
        f"{len(result.predictions)} valid layouts, {fits} fit in {d.usable_bytes / GB:.1f} GB per rank"
        f" ({d.memory_bytes / GB:.1f} GB less {d.reserved_bytes / GB:.1f} GB reserved and"
        f" {d.fragmentation:.0%} fragmentation), {result.recommendable} leave the {margin:.0%} memory margin"
        f' (cluster.memory_margin; the others fit "tight"); calibration: {pl.cal.source}',
        "memory of the worst rank: model state (weights, gradients, AdamW), saved activations of the micro-batches"
        " in flight, backward working set, pipeline/FSDP buffers; step time by part, exposed communication only",
    ]
    if result.ranking.ties:
        lines.append(
            f"rows 1-{result.ranking.ties}: ties, within {TIME_ERROR:.0%} (the time model's error) of the fastest"
            f" step, {result.ranking.best_s:.3f} s; ordered by memory headroom, then simplicity (ranking.py)"
        )
    lines.append(HEADER)
    shown = result.predictions[:top]
    lines += [row(i, p, result.fit_class(p)) for i, p in enumerate(shown, start=1)]
    if len(result.predictions) > top:
        lines.append(f"  ... {len(result.predictions) - top} more (--top N, or --json for all)")
    lines += configured(result)
    return "\n".join(lines + recommendation(result))


def configured(result: PlanResult) -> list[str]:
    """Where the config's own layout ranks, when it is a layout of these ranks."""
    try:
        layout = layout_of(result.planner.cfg, result.world)
    except ValueError:  # its degrees do not multiply to this world
        return []
    i = result.position(layout)
    if i is None:
        return []
    p = result.predictions[i - 1]
    return [
        f"configured layout {layout.label()}: row {i} of {len(result.predictions)},"
        f" {p.time.total:.3f} s a step, peak {p.worst.total / GB:.1f} GB ({result.fit_class(p)})"
    ]


def recommendation(result: PlanResult) -> list[str]:
    d, margin = result.planner.device, result.ranking.margin
    if result.recommended:
        lines = [f"recommended (rows 1-{len(result.recommended)} of {result.ranking.ties} ties):"]
        for i, p in enumerate(result.recommended, start=1):
            lines.append(f"  {i}. {p.layout.label()}: {' '.join(p.layout.overrides())}")
        return lines
    tight = next((i for i, p in enumerate(result.predictions, start=1) if p.fits), None)
    if tight is not None:
        return [
            f"nothing recommended: no layout leaves cluster.memory_margin={margin:g} of the"
            f" {d.usable_bytes / GB:.1f} GB free; the fastest that fits is row {tight}"
            " (more nodes, a shorter train.seq_len or a smaller train.batch_size, or a smaller margin)"
        ]
    least = result.predictions[0]
    return [
        f"no layout fits: the smallest peak is {least.worst.total / GB:.1f} GB against {d.usable_bytes / GB:.1f} GB"
        " (more nodes, a shorter train.seq_len or a smaller train.batch_size)"
    ]


def as_json(result: PlanResult) -> dict:
    pl = result.planner
    return {
        "model": pl.cfg.model.name,
        "device": pl.device.name,
        "nodes": result.nodes,
        "ranks_per_node": pl.per_node,
        "world": result.world,
        "usable_bytes": pl.device.usable_bytes,
        "memory_margin": result.ranking.margin,
        "time_error": TIME_ERROR,
        "ties": result.ranking.ties,
        "calibration": pl.cal.to_json(),
        "layouts": [prediction_json(p, result.fit_class(p)) for p in result.predictions],
        "recommended": [p.layout.overrides() for p in result.recommended],
    }


def prediction_json(p: Prediction, fit_class: str) -> dict:
    w, t = p.worst, p.time
    return {
        "layout": p.layout.label(),
        "overrides": p.layout.overrides(),
        "fits": p.fits,
        "within_margin": fit_class == OK,
        "headroom": p.headroom,
        "memory_bytes": {
            "peak": w.total,
            "pp_rank": w.pp_rank,
            "params": w.params,
            "grads": w.grads,
            "optimizer": w.optimizer,
            "activations": w.activations,
            "working": w.working,
            "buffers": w.buffers,
            "activation_parts": w.parts,
            "per_pp_rank": [r.total for r in p.peaks],
        },
        "step_s": {
            "total": t.total,
            "compute": t.compute,
            "tp": t.tp,
            "ep": t.ep,
            "pp": t.pp,
            "dp": t.dp,
            "bubble": t.bubble,
            "optimizer": t.optimizer,
            "overhead": t.overhead,
        },
        "tokens_per_s": p.tokens_per_s,
        "tflops_per_device": p.tflops_per_device,
        "mfu": p.mfu,
    }


def cmd_plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="moeyard plan",
        description="Predict per-rank memory and step time of every parallel layout of a job on a cluster.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=mixtral_8x7b cluster.nodes=8")
    parser.add_argument("--json", action="store_true", help="print every layout as JSON")
    parser.add_argument("--calibration", default=None, help="benchmarks/gpu_check.py --out JSON, or a CPU profile")
    parser.add_argument("--top", type=int, default=25, help="rows of the table (default 25)")
    args = parser.parse_args(argv)
    try:
        cfg = compose(args.overrides)
        check_fields(cfg.cluster, "cluster.")  # as `moeyard train` checks it
        check_cluster(cfg.cluster)
        cfg.cluster = planned_cluster(cfg)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"moeyard: config error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"moeyard: config error: {err}", file=sys.stderr)
        return 2
    try:
        result = plan(cfg, args.calibration)
    except ConfigError as err:  # the cluster admits no layout of this job
        print(f"moeyard: config error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(as_json(result), indent=1) if args.json else render(result, args.top))
    return 0
