"""Where our MoE layer's forward+backward time goes, phase by phase, from torch.profiler.

moe/ has no profiler ranges of its own, so this script wraps the layer's pieces from outside, at run time
only: each function or method named in PHASES that exists in the current moe/ code runs inside a
`record_function(<phase>)` range (a missing name is reported and skipped, so the script survives rewrites).
Forward time is the self time of the ops inside each innermost range. Backward time is charged to the
phase whose forward op created the autograd node (matched by sequence number), so "gather" also holds the
scatter-add of the gather's backward, "combine" the index_select of index_add's backward, and so on;
"accumulate grads" is autograd adding weight gradients. A hand-written backward (the experts' SwiGLU on
CPU) is one autograd node: all of it is charged to its own phase, its grouped matmuls included. The floor
(the same routing's three grouped matmuls on pre-sorted tokens, benchmarks/moe_layer.py) is timed in the
same run for scale.

Run: .venv/bin/python benchmarks/profile_layer.py [--shape N] [--threads 2] [--steps 5] [--ops 15] [--quick]
     (--shape indexes benchmarks/moe_layer.py's SHAPES; the default is the fine-grained one, the last)
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from moe_layer import (  # the sibling script (sys.path[0])
    QUICK_SHAPES,
    SHAPES,
    floor_step,
    layer_input,
    layer_step,
    our_layer,
)
from torch.autograd.profiler_util import FunctionEvent

import moeyard.moe.dispatcher as moe_dispatcher
import moeyard.moe.experts as moe_experts
import moeyard.moe.layer as moe_layer
import moeyard.moe.router as moe_router

PHASES: list[tuple[object, str, str]] = [
    (moe_router.Router, "forward", "router (linear, scores, top-k weights)"),
    (moe_router.Router, "_select", "router: top-k selection"),
    (moe_router, "count_per_expert", "counts per expert"),
    (moe_dispatcher, "count_per_expert", "counts per expert"),  # imported by name there: patch both
    (moe_router, "switch_aux_loss", "router: balancing/z losses, entropy"),
    (moe_router, "sequence_aux_loss", "router: balancing/z losses, entropy"),
    (moe_router, "z_loss", "router: balancing/z losses, entropy"),
    (moe_router, "_entropy", "router: balancing/z losses, entropy"),
    (moe_dispatcher, "expert_order", "permute: argsort by expert"),
    (moe_dispatcher, "kept_count", "kept count"),
    (moe_dispatcher, "gather_rows", "gather rows (index_select)"),
    (moe_dispatcher, "combine_rows", "combine (weight, index_add)"),
    (moe_experts.GroupedExperts, "forward", "experts: casts, silu*mul, offsets"),
    (moe_experts.SwiGLUGroupedMM, "apply", "experts: SwiGLU with hand-written backward"),
    (moe_experts, "_grouped_mm", "experts: grouped_mm"),
    (moe_layer.MoELayer, "forward", "layer: aux attach, stats, views"),
]
"""(owner, attribute, phase): the pieces wrapped in ranges, outermost first (nested ranges: innermost wins)."""
RANGE_PREFIX = "phase: "


def wrap_phases() -> list[str]:
    """Wraps every PHASES entry that exists in a profiler range; returns the names that do not exist."""
    missing = []
    for owner, name, phase in PHASES:
        fn = getattr(owner, name, None)
        if fn is None:
            missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
            continue
        setattr(owner, name, _ranged(fn, RANGE_PREFIX + phase))
    return missing


def _ranged(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapped


def _phase_of(event: FunctionEvent) -> str | None:
    """The innermost phase range around `event` (itself included), or None."""
    while event is not None:
        if event.name.startswith(RANGE_PREFIX):
            return event.name.removeprefix(RANGE_PREFIX)
        event = event.cpu_parent
    return None


def _in_backward(event: FunctionEvent) -> FunctionEvent | None:
    """The autograd engine node `event` runs under, or None in the forward pass."""
    while event is not None:
        if event.name.startswith("autograd::engine::evaluate_function"):
            return event
        event = event.cpu_parent
    return None


def breakdown(events: list[FunctionEvent], steps: int) -> dict[tuple[str, str], float]:
    """ms per step by (phase, "fwd" | "bwd") from the profiler's events."""
    # Every forward op records the autograd sequence number current at its start; the op that creates a
    # node takes that number and moves the counter on, so the creator is the last op to see its number.
    creator_phase: dict[int, str] = {}
    for ev in sorted(events, key=lambda e: e.time_range.start):
        if ev.sequence_nr >= 0 and _in_backward(ev) is None and not ev.name.startswith(RANGE_PREFIX):
            creator_phase[ev.sequence_nr] = _phase_of(ev) or "outside the layer"
    out: dict[tuple[str, str], float] = defaultdict(float)
    for ev in events:
        if ev.name.startswith(RANGE_PREFIX) or ev.name.startswith("ProfilerStep"):
            continue
        node = _in_backward(ev)
        if node is None:
            out[(_phase_of(ev) or "outside the layer", "fwd")] += ev.self_cpu_time_total
        elif "AccumulateGrad" in node.name:
            out[("accumulate grads", "bwd")] += ev.self_cpu_time_total
        else:
            phase = creator_phase.get(node.sequence_nr, "backward, creator not found")
            out[(phase, "bwd")] += ev.self_cpu_time_total
    return {key: us / 1e3 / steps for key, us in out.items()}


def print_breakdown(ms: dict[tuple[str, str], float], step_ms: float, floor_ms: float) -> None:
    phases = sorted({p for p, _ in ms}, key=lambda p: -(ms.get((p, "fwd"), 0) + ms.get((p, "bwd"), 0)))
    total = sum(ms.values())
    print(f"{'phase':<42} {'fwd ms':>8} {'bwd ms':>8} {'total':>8} {'share':>6}")
    for p in phases:
        fwd, bwd = ms.get((p, "fwd"), 0.0), ms.get((p, "bwd"), 0.0)
        print(f"{p:<42} {fwd:>8.2f} {bwd:>8.2f} {fwd + bwd:>8.2f} {(fwd + bwd) / total:>6.1%}")
    print(f"{'sum of op self times':<42} {'':>8} {'':>8} {total:>8.2f}")
    print(f"step wall time unprofiled: ours {step_ms:.2f} ms, floor {floor_ms:.2f} ms ({step_ms / floor_ms:.2f}x)")


def median_ms(step: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, default=len(SHAPES) - 1, help="index into moe_layer.SHAPES")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=5, help="profiled steps (after 3 warmup)")
    parser.add_argument("--ops", type=int, default=15, help="rows of the op table (0: none)")
    parser.add_argument("--quick", action="store_true", help="moe_layer's tiny shape, 1 step: a smoke run")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, device = QUICK_SHAPES[0] if args.quick else SHAPES[args.shape], torch.device("cpu")
    if args.quick:
        args.steps = 1
    x, grad = layer_input(shape, device, torch.float32)
    ours = our_layer(shape, "on", device, torch.float32)
    step, floor = layer_step(ours, x, grad), floor_step(ours, x, grad)
    for _ in range(3):
        step(), floor()
    # Unprofiled timings alternate, so machine drift hits both alike.
    pairs = [(median_ms(step, 1), median_ms(floor, 1)) for _ in range(args.steps)]
    step_ms, floor_ms = (statistics.median(t) for t in zip(*pairs, strict=True))
    missing = wrap_phases()
    print(f"{shape}, cpu {torch.get_num_threads()} threads, fp32, {args.steps} profiled steps")
    if missing:
        print(f"not found in moe/ (skipped): {', '.join(missing)}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print_breakdown(breakdown(list(prof.events()), args.steps), step_ms, floor_ms)
    if args.ops:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops))


if __name__ == "__main__":
    main()
