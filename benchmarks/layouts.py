"""Training throughput (tokens/s) of each parallel layout against one process, on this machine.

Every layout trains the same tiny model on the same batches with the real trainer (train/trainer.py), its
ranks started with torch.multiprocessing on gloo; rank 0's median step time after warmup gives tokens/s.
Every rank runs one torch thread, the baseline "single" too, so an n-rank row uses n cores (a 4-rank layout
on 2 cores shares them); "single mt" adds one process with all cores as threads. One thread per process
because several multi-threaded processes on busy cores stall each other (a 2-thread run on a loaded 2-core
machine took 6 s per step, 25x its 1-thread time). On a CPU this is informational: ranks talk over loopback,
so the rows show each layout's overhead here, not its speed-up on a cluster.
Where CUDA is present, one-GPU rows (fp32 and bf16) follow for the same model and for the demo model.

Run: .venv/bin/python benchmarks/layouts.py [--quick] [--steps N] [--warmup N] [--layouts dp2,ep2,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
import torch.distributed as dist

from moeyard.job.compose import compose
from moeyard.plan.planner import Layout
from moeyard.train.spawn import spawn_ranks
from moeyard.train.trainer import Trainer

OVERLAP = ["moe.num_shared_experts=2", "profiling.breakdown_every=1"]
"""The overlap rows: shared experts to hide the dispatch behind, and every step's breakdown (its time inside
all-to-all, `a2a ms`, and forward time)."""
MICRO_BATCHES = 2
"""Micro-batches of every row (WORKLOAD's), so the pipeline layouts have work per stage."""
LAYOUTS: dict[str, tuple[Layout, list[str]]] = {
    "single": (Layout.single(micro_batches=MICRO_BATCHES), []),
    "single mt": (Layout.single(micro_batches=MICRO_BATCHES), []),
    "dp2": (Layout.single(micro_batches=MICRO_BATCHES, dp=2), []),
    "dp2 fsdp": (Layout.single(micro_batches=MICRO_BATCHES, dp=2, dp_mode="fsdp"), []),
    "tp2": (Layout.single(micro_batches=MICRO_BATCHES, tp=2), []),
    "tp2 sp": (Layout.single(micro_batches=MICRO_BATCHES, tp=2, sp=True), []),
    "ep2": (Layout.single(micro_batches=MICRO_BATCHES, dp=2, ep=2), []),
    "pp2": (Layout.single(micro_batches=MICRO_BATCHES, pp=2), []),
    "tp2·ep2": (Layout.single(micro_batches=MICRO_BATCHES, tp=2, dp=2, ep=2), []),
    "pp2·ep2": (Layout.single(micro_batches=MICRO_BATCHES, pp=2, dp=2, ep=2), []),
    "ep2 ovl none": (Layout.single(micro_batches=MICRO_BATCHES, dp=2, ep=2), OVERLAP),
    "ep2 ovl shared": (
        Layout.single(micro_batches=MICRO_BATCHES, dp=2, ep=2),
        ["parallel.ep_overlap=shared", *OVERLAP],
    ),
    "ep2 ovl chunk": (
        Layout.single(micro_batches=MICRO_BATCHES, dp=2, ep=2),
        ["parallel.ep_overlap=chunked", "parallel.ep_chunks=4", *OVERLAP],
    ),
}
"""Row name -> (the planner's Layout, other overrides). "single mt" is one process with all cores as torch
threads; every other row runs one thread per rank."""
QUICK_LAYOUTS = ["single", "ep2"]
WORKLOAD = [
    "model=debug",
    "train.micro_batches=2",
    "train.eval_every=0",
    "data.max_files=40",
    "profiling.progress=false",
    "train.device=cpu",
]
"""Same model and batches for every layout; 2 micro-batches so the pipeline layouts have work per stage."""
TIMEOUT_S = 300


def _rank(rank: int, overrides: list[str], out: str) -> None:
    """One rank: train with the real trainer (its console output to a log), rank 0 saves per-step metrics."""
    with open(f"{out}.rank{rank}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        history = Trainer(compose(overrides)).fit()
    if rank == 0:
        torch.save(history, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_layout(world: int, overrides: list[str], threads: int, out: Path) -> list[dict]:
    """Trains on `world` spawned gloo ranks (killed after TIMEOUT_S); returns rank 0's metrics per step."""
    spawn_ranks(_rank, (overrides, str(out)), world, TIMEOUT_S, threads, f"layout {overrides}")
    return torch.load(out, weights_only=True)


def measure(world: int, overrides: list[str], threads: int, warmup: int, out: Path) -> tuple[float, float, str]:
    """Median step seconds after `warmup` steps, tokens/s at that step time, and the median forward and
    all-to-all milliseconds of the sampled steps (blank when none was sampled)."""
    history = run_layout(world, overrides, threads, out)
    step_s = statistics.median(h["step_time_s"] for h in history[warmup:])
    tokens = round(history[-1]["tokens_per_s"] * history[-1]["step_time_s"])  # batch_size * seq_len
    sampled = [h for h in history[warmup:] if "time_forward_ms" in h]
    breakdown = ""
    if sampled:
        forward = statistics.median(h["time_forward_ms"] for h in sampled)
        a2a = statistics.median(h.get("comm_all_to_all_ms", 0.0) for h in sampled)
        breakdown = f"{forward:>8.1f} {a2a:>7.1f}"
    return step_s, tokens / step_s, breakdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="single and ep2, 2 small steps (smoke test)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step (train.batch_size)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (train.seq_len)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: " + ", ".join(LAYOUTS))
    args = parser.parse_args(argv)
    names = QUICK_LAYOUTS if args.quick else [n.strip() for n in args.layouts.split(",")]
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.seq_len = 2, 1, 4, 32
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: unknown {unknown}; choose from {', '.join(LAYOUTS)}")
    if args.steps <= args.warmup:
        parser.error(f"--steps={args.steps} must exceed --warmup={args.warmup}")
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="moeyard-layouts-") as tmp_dir:
        tmp = Path(tmp_dir)
        shape = [f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}"]
        common = [*WORKLOAD, *shape, f"train.steps={args.steps}", f"run.dir={tmp / 'run'}"]
        print(
            f"Training throughput per layout: {' '.join(WORKLOAD[:2] + shape)}, cpu ({cores} cores, load average "
            f"{load:.1f} at start), median step after {args.warmup} warmup of {args.steps}"
        )
        head = f"{'layout':<14} {'ranks':>5} {'threads':>7} {'step ms':>9} {'tokens/s':>10} {'x single':>8}"
        print(f"{head} {'fwd ms':>8} {'a2a ms':>7}")
        base = None
        for name in ["single", *[n for n in names if n != "single"]]:
            layout, extra = LAYOUTS[name]
            world = layout.world
            threads = cores if name == "single mt" else 1
            overrides = [*common, *layout.overrides(), *extra]
            step_s, tps, breakdown = measure(world, overrides, threads, args.warmup, tmp / f"{name}.pt")
            base = base or tps
            row = f"{name:<14} {world:>5} {threads:>7} {step_s * 1e3:>9.1f} {tps:>10.0f} {tps / base:>8.2f}"
            print(f"{row} {breakdown}")
        if torch.cuda.is_available():
            gpu_rows(common, args.warmup, tmp)


def gpu_rows(common: list[str], warmup: int, tmp: Path) -> None:
    """One-GPU throughput for the benchmark model and the demo model, fp32 and bf16."""
    print(f"\nOne GPU ({torch.cuda.get_device_name()}):")
    print(f"{'model':<10} {'dtype':>5} {'step ms':>9} {'tokens/s':>10}")
    gpu = [o for o in common if o not in ("train.device=cpu", "model=debug")] + ["train.device=cuda"]
    for model in ("debug", "demo"):
        for dtype in ("fp32", "bf16"):
            overrides = [*gpu, f"model={model}", f"train.dtype={dtype}"]
            step_s, tps, _ = measure(1, overrides, 1, warmup, tmp / f"gpu-{model}-{dtype}.pt")
            print(f"{model:<10} {dtype:>5} {step_s * 1e3:>9.1f} {tps:>10.0f}")


if __name__ == "__main__":
    main()
