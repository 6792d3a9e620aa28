"""Start-up cost of the trainer: wall time and peak host memory of building it, one process against n ranks.

Each row starts fresh processes (gloo ranks through torch.multiprocessing, one torch thread each) that import
everything, note their resident memory, then construct `train.trainer.Trainer` (mesh, model built on the meta
device, sharded, allocated and initialised; optimizer, data, checkpointer) and nothing more. Reported per row:
the slowest rank's construction time, the CPU time of all ranks together (the total work, steadier than wall
time on a shared machine), the largest rank's peak RSS (ru_maxrss: imports included) and its growth during
construction (peak minus the RSS just before it, i.e. without the fixed cost of Python and torch).

The default model is the debug model widened to 1.6 GB of fp32 parameters (8 blocks of 64 experts,
dim = expert_hidden = 512), so one process's start-up is dominated by its weights. Under a scale-true start-up
each of n ranks grows by about 1/n of one process's growth.

Run: .venv/bin/python benchmarks/startup.py [--quick] [--layouts single,ep4,dp4-fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import torch
import torch.distributed as dist

from moeyard.job.compose import compose
from moeyard.plan.planner import Layout
from moeyard.train.spawn import spawn_ranks
from moeyard.train.trainer import Trainer

BIG_MODEL = [
    "model=debug",
    "model.dim=512",
    "model.n_layers=8",
    "model.n_heads=8",
    "model.n_kv_heads=4",
    "moe.num_experts=64",
    "moe.expert_hidden=512",
]
"""~409M parameters (1.64 GB in fp32), 98% of them routed experts."""
QUICK_MODEL = ["model=debug"]
COMMON = ["train.device=cpu", "profiling=off", "data.max_files=20", "train.eval_every=0", "train.steps=1"]
M = 2  # train.micro_batches' default
LAYOUTS: dict[str, Layout] = {
    "single": Layout.single(micro_batches=M),
    "ep2": Layout.single(micro_batches=M, dp=2, ep=2),
    "ep4": Layout.single(micro_batches=M, dp=4, ep=4),
    "dp4-fsdp": Layout.single(micro_batches=M, dp=4, dp_mode="fsdp"),
    "ep4-fsdp": Layout.single(micro_batches=M, dp=4, ep=4, dp_mode="fsdp"),
    "tp2-ep2": Layout.single(micro_batches=M, tp=2, dp=2, ep=2),
}
"""Row name -> the planner's Layout."""
DEFAULT_LAYOUTS = ["single", "ep4", "dp4-fsdp"]
COLUMNS = [("start-up s", "seconds"), ("cpu s", "cpu"), ("peak RSS MB", "peak_mb"), ("growth MB", "growth_mb")]
"""Table columns: the slowest rank's wall time, CPU time summed over ranks, the largest rank's peak RSS and
growth during construction; each followed by its ratio to one process."""
QUICK_LAYOUTS = ["single", "ep2"]
TIMEOUT_S = 900


def _rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rank(rank: int, overrides: list[str], out: str) -> None:
    """One rank: construct the trainer, record time and memory to OUT.rankN.json."""
    cfg = compose(overrides)
    before = _rss_mb()
    with open(f"{out}.rank{rank}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        t0, cpu0 = time.perf_counter(), time.process_time()
        Trainer(cfg)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    result = {"seconds": seconds, "cpu": cpu, "peak_mb": peak, "before_mb": before}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def measure(world: int, overrides: list[str], out: Path) -> dict[str, float]:
    """Start-up on `world` fresh ranks: slowest rank's seconds, CPU seconds of all ranks, largest peak RSS and
    growth (MB)."""
    spawn_ranks(_rank, (overrides, str(out)), world, TIMEOUT_S, what=f"start-up of {overrides}")
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(world)]
    return {
        "seconds": max(r["seconds"] for r in ranks),
        "cpu": sum(r["cpu"] for r in ranks),
        "peak_mb": max(r["peak_mb"] for r in ranks),
        "growth_mb": max(r["peak_mb"] - r["before_mb"] for r in ranks),
    }


def n_params(overrides: list[str]) -> int:
    """Parameters of the model `overrides` describe (built on the meta device)."""
    from moeyard.moe.model import Transformer

    cfg = compose(overrides)
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg.model, cfg.moe).parameters())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the debug model, single and ep2 (smoke test)")
    parser.add_argument("--layouts", default=",".join(DEFAULT_LAYOUTS), help="comma-separated: " + ", ".join(LAYOUTS))
    args = parser.parse_args(argv)
    names = QUICK_LAYOUTS if args.quick else [n.strip() for n in args.layouts.split(",")]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: unknown {unknown}; choose from {', '.join(LAYOUTS)}")
    model = QUICK_MODEL if args.quick else BIG_MODEL
    params = n_params([*model, *COMMON])
    print(
        f"Trainer start-up: {' '.join(model)} ({params / 1e6:.1f}M parameters, {params * 4 / 1e9:.3f} GB fp32), "
        f"cpu ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start), one torch thread per rank"
    )
    header = "".join(f" {title:>{len(title)}} {'x single':>8}" for title, _ in COLUMNS)
    print(f"{'layout':<10} {'ranks':>5}{header}")
    base = None
    with tempfile.TemporaryDirectory(prefix="moeyard-startup-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name in ["single", *[n for n in names if n != "single"]]:
            world = LAYOUTS[name].world
            m = measure(world, [*model, *COMMON, *LAYOUTS[name].overrides(), f"run.dir={tmp / name}"], tmp / name)
            base = base or m
            cells = "".join(f" {m[key]:>{len(title)}.1f} {m[key] / base[key]:>8.2f}" for title, key in COLUMNS)
            print(f"{name:<10} {world:>5}{cells}", flush=True)


if __name__ == "__main__":
    main()
