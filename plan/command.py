"""`moeyard plan [overrides] [--json] [--calibration FILE] [--top N]`: the ranked table of layouts."""

from __future__ import annotations

import argparse
import json
import sys

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from moeyard.job.compose import compose
from moeyard.moe.config import check_fields
from moeyard.plan.cluster import check_cluster
from moeyard.plan.layouts import PlanResult, plan
from moeyard.plan.planner import Prediction

GB = 1e9

HEADER = (
    f"{'#':>4}  {'layout':<42} {'fits':>4} {'peak GB':>8} {'state':>6} {'act':>6} {'work':>5} {'buf':>5} |"
    f" {'step s':>8} {'comp':>7} {'tp':>6} {'ep':>6} {'pp':>6} {'dp':>6} {'bubble':>6} {'other':>6} |"
    f" {'tokens/s':>10} {'MFU':>6}"
)


def row(i: int, p: Prediction) -> str:
    w, t = p.worst, p.time
    act = w.activations
    return (
        f"{i:>4}  {p.layout.label():<42} {'yes' if p.fits else 'NO':>4} {w.total / GB:>8.1f}"
        f" {w.model_state / GB:>6.1f} {act / GB:>6.1f} {w.working / GB:>5.1f} {w.buffers / GB:>5.1f} |"
        f" {t.total:>8.3f} {t.compute:>7.3f} {t.tp:>6.3f} {t.ep:>6.3f} {t.pp:>6.3f} {t.dp:>6.3f}"
        f" {t.bubble:>6.3f} {t.optimizer + t.overhead:>6.3f} | {p.tokens_per_s:>10.0f} {p.mfu:>6.1%}"
    )


def render(result: PlanResult, top: int) -> str:
    pl = result.planner
    cfg, d = pl.cfg, pl.device
    fits = sum(p.fits for p in result.predictions)
    dtype = "bf16" if pl.bf16 else "fp32"
    lines = [
        f"moeyard plan: {cfg.model.name} on {result.nodes} node(s) x {pl.per_node} {d.name} ({result.world} ranks);"
        f" {cfg.train.batch_size} sequences x {cfg.train.seq_len} tokens per step, {dtype}",
        f"{len(result.predictions)} valid layouts, {fits} fit in {d.usable_bytes / GB:.1f} GB per rank"
        f" ({d.memory_bytes / GB:.1f} GB less {d.reserved_bytes / GB:.1f} GB reserved and"
        f" {d.fragmentation:.0%} fragmentation); calibration: {pl.cal.source}",
        "memory of the worst rank: model state (weights, gradients, AdamW), saved activations of the micro-batches"
        " in flight, backward working set, pipeline/FSDP buffers; step time by part, exposed communication only",
        HEADER,
    ]
    shown = result.predictions[:top]
    lines += [row(i, p) for i, p in enumerate(shown, start=1)]
    if len(result.predictions) > top:
        lines.append(f"  ... {len(result.predictions) - top} more (--top N, or --json for all)")
    if result.recommended:
        lines.append("recommended:")
        for i, p in enumerate(result.recommended, start=1):
            lines.append(f"  {i}. {p.layout.label()}: {' '.join(p.layout.overrides())}")
    else:
        worst = result.predictions[0]
        lines.append(
            f"no layout fits: the smallest peak is {worst.worst.total / GB:.1f} GB against {d.usable_bytes / GB:.1f} GB"
            " (more nodes, a shorter train.seq_len or a smaller train.batch_size)"
        )
    return "\n".join(lines)


def as_json(result: PlanResult) -> dict:
    pl = result.planner
    return {
        "model": pl.cfg.model.name,
        "device": pl.device.name,
        "nodes": result.nodes,
        "ranks_per_node": pl.per_node,
        "world": result.world,
        "usable_bytes": pl.device.usable_bytes,
        "calibration": pl.cal.to_json(),
        "layouts": [prediction_json(p) for p in result.predictions],
        "recommended": [p.layout.overrides() for p in result.recommended],
    }


def prediction_json(p: Prediction) -> dict:
    w, t = p.worst, p.time
    return {
        "layout": p.layout.label(),
        "overrides": p.layout.overrides(),
        "fits": p.fits,
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
    except (HydraException, OmegaConfBaseException) as err:
        print(f"moeyard: config error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"moeyard: config error: {err}", file=sys.stderr)
        return 2
    result = plan(cfg, args.calibration)
    print(json.dumps(as_json(result), indent=1) if args.json else render(result, args.top))
    return 0
