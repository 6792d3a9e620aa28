"""One-GPU check: MoEyard's own training path on this device and torch, in one table and one JSON file.

  first contact  what the installed torch does where MoEyard meets it (benchmarks/gpu_checks/contact.py): the
                 pipeline-stage API (against parallel/compat.py's detection) and a pp2 bf16 run on two CPU
                 ranks against one process; grouped_mm against one matmul per expert on empty and odd expert
                 groups (errors, host synchronisations, fused kernel or fallback); the host time of a batch
                 copy (the trainer's pinned non_blocking copy against pageable ones); per attention shape
                 (GQA and MLA, causal and packed documents) the kernel the model picks (FlexAttention or SDPA
                 limited to its fused kernels) with its time and peak memory, the backend SDPA alone would pick,
                 and each SDPA backend's and FlexAttention's peak memory.
  train          the real `Trainer` (benchmarks/gpu_checks/runs.py), configured as `moeyard train` configures
                 it (JobConfig from the preset objects of moe/presets.py, launch/validate.py's checks, no
                 Hydra): the debug model (8 x 128 tokens) and a 2-block cut of Mixtral-8x7B (dim 4096, 8
                 experts of hidden 14336, top-2, GQA 32/8 heads, vocab 32000, 2 x 4096 tokens), each for
                 --steps steps in bf16 (autocast over fp32 masters) with AdamW as the trainer builds it (fused
                 on CUDA), eager and compiled (parallel.compile), without and with full activation
                 checkpointing. Per run: step time (median after --warmup steps), tokens/s, model TFLOP/s and
                 MFU (profiling/flops.py; dense bf16 peak of the GPU by name, profiling/devices.py), peak
                 memory against the planner's prediction for the same job, losses, and under compile the
                 graphs, graph breaks and recompiles torch._dynamo counted.
  layer          one MoE layer, forward+backward, at the Mixtral-8x7B and DeepSeek-V3 layer shapes (8192
                 tokens): the grouped_mm floor, our layer and transformers' block with our weights
                 (benchmarks/moe_layer.py builds them); "expert TFLOP/s" is the routed experts' matmul FLOPs
                 over the time; on CUDA also each variant's host synchronisations.

Status: ok, FAIL (MoEyard's path fails or waits where it must not; the exit status is then 1) or info (a fact
of this torch, e.g. SDPA's math kernel for a shape). `--out FILE` writes the JSON that `moeyard plan
--calibration FILE` reads (plan/calibration.py names the keys), with each run's model_config and moe_config.

Nothing here imports Hydra or OmegaConf. Run with MoEyard installed (`pip install --no-deps -e .`, or from
`make setup`'s .venv); without CUDA it runs small shapes (--small), and --quick is the smoke run CI uses:
    .venv/bin/python benchmarks/gpu_check.py [--quick] [--out gpu_check.json]
On the lent GPU machine (torch 2.11 + CUDA 13 with transformers, safetensors and rich; no crc32c, hydra-core,
omegaconf or antlr4), designed to take under 8 minutes on one H100/H200. Prepare the wheels here once, into the
git-ignored .whl/ (crc32c is imported by the trainer, setuptools>=68 builds the editable install offline,
hydra-core, omegaconf and antlr4 serve `moeyard train` there):
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
        crc32c setuptools hydra-core==1.3.8 omegaconf==2.3.1
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # an sdist on PyPI: built here
then one call of the device tool, carry [".whl"], timeout_s 600, command:
    python3 -m pip install -q --no-index --no-deps .whl/*.whl && python3 -m pip install -q --no-deps
    --no-build-isolation -e . && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from gpu_checks.contact import (
    attention_check,
    attention_shapes,
    first_line,
    grouped_mm_check,
    h2d_check,
    host_syncs,
    pipeline_api,
    pipeline_run,
)
from gpu_checks.runs import ALL_VARIANTS, ModelCase, Variant, train_run
from moe_layer import Shape, time_steps, transformers_available, variants  # the sibling script (sys.path[0])

from moeyard.moe.presets import PRESETS
from moeyard.profiling.flops import device_peak_tflops

DEBUG = ModelCase(model=PRESETS["debug"].model_config(), moe=PRESETS["debug"].moe_config(), batch=8, seq_len=128)
MIXTRAL_2 = ModelCase(
    model=replace(PRESETS["mixtral_8x7b"].model_config(), name="mixtral_8x7b_2blocks", n_layers=2, max_seq_len=4096),
    moe=PRESETS["mixtral_8x7b"].moe_config(),
    batch=2,
    seq_len=4096,
)
MIXTRAL_LAYER = Shape.of(PRESETS["mixtral_8x7b"].model_config(), PRESETS["mixtral_8x7b"].moe_config(), tokens=8192)
DEEPSEEK_LAYER = Shape.of(PRESETS["deepseek_v3"].model_config(), PRESETS["deepseek_v3"].moe_config(), tokens=8192)


def small(case: ModelCase, dim: int, hidden: int, seq_len: int, batch: int) -> ModelCase:
    """`case` scaled down for a CPU: the same block count, expert count, top-k and head ratio."""
    heads = max(2, dim // 64)
    kv = max(1, heads * case.model.n_kv_heads // case.model.n_heads)
    model = replace(case.model, name=case.model.name + "_small", vocab_size=min(case.model.vocab_size, 512))
    model = replace(model, dim=dim, n_heads=heads, n_kv_heads=kv, ffn_hidden=hidden, max_seq_len=seq_len)
    return ModelCase(model=model, moe=replace(case.moe, expert_hidden=hidden), batch=batch, seq_len=seq_len)


def layer_small(shape: Shape, tokens: int, dim: int, experts: int, hidden: int) -> Shape:
    """`shape` scaled down for a CPU, keeping its routing (top-k, groups, shared experts)."""
    return replace(shape, tokens=tokens, dim=dim, experts=experts, hidden=hidden)


@dataclass(frozen=True)
class Plan:
    """What one size runs: training runs (a model and how its blocks run), layer shapes, check sizes."""

    runs: list[tuple[ModelCase, Variant]]
    layers: list[Shape]
    grouped_mm: tuple[int, int, int]
    """The grouped_mm check's model dim, expert hidden and group-size scale."""


def plan(size: str) -> Plan:
    """The checks at `size`: full (GPU), small (CPU) or quick (the smoke run: one compiled run, the one that
    counts graphs under activation checkpointing, since inductor's first compile takes 15 s or more on a CPU)."""
    if size == "full":
        runs = [(case, v) for case in (DEBUG, MIXTRAL_2) for v in ALL_VARIANTS]
        return Plan(runs, [MIXTRAL_LAYER, DEEPSEEK_LAYER], (4096, 1408, 64))
    if size == "small":
        cases = (DEBUG, small(MIXTRAL_2, dim=256, hidden=512, seq_len=256, batch=4))
        layers = [layer_small(MIXTRAL_LAYER, 1024, 256, 8, 512), layer_small(DEEPSEEK_LAYER, 1024, 256, 64, 128)]
        return Plan([(case, v) for case in cases for v in ALL_VARIANTS], layers, (256, 128, 8))
    debug, mixtral = replace(DEBUG, batch=2, seq_len=32), small(MIXTRAL_2, dim=64, hidden=64, seq_len=64, batch=2)
    runs = [(debug, Variant(compile=False)), (debug, Variant(compile=True, ac="full")), (mixtral, Variant(False))]
    layers = [layer_small(MIXTRAL_LAYER, 128, 64, 8, 64), layer_small(DEEPSEEK_LAYER, 128, 64, 32, 32)]
    return Plan(runs, layers, (64, 32, 2))


# ---------------------------------------------------------------------------------------------------- layers


def hf_impls(shape: Shape) -> tuple[str, ...]:
    """transformers' grouped_mm path always; its eager loop only for few experts: each expert's
    gate_up_proj[e] indexing writes a full-size weight gradient in backward (cost grows as E^2)."""
    return ("grouped_mm", "eager") if shape.experts <= 64 else ("grouped_mm",)


def layer_case(
    shape: Shape, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int, hf: bool
) -> dict[str, Any]:
    """Times the layer variants of `shape`; returns its record."""
    steps, counts_E = variants(
        shape, device, dtype, with_ds=False, hf_impls=hf_impls(shape) if hf else (), looped=False
    )
    ms = time_steps(steps, warmup, repeats, device)
    floor, flops = ms["floor (grouped_mm)"], shape.expert_flops()
    rows = [
        {
            "variant": name,
            "ms": value,
            "x_floor": value / floor,
            "expert_tflops": flops / value / 1e9,
            "host_syncs": host_syncs(steps[name], device),
        }
        for name, value in ms.items()
    ]
    counts = counts_E.float()
    return {
        "shape": {**asdict(shape), "label": str(shape)},
        "dtype": str(dtype).removeprefix("torch."),
        "expert_fwd_bwd_flops": flops,
        "tokens_per_expert": {"min": counts.min().item(), "mean": counts.mean().item(), "max": counts.max().item()},
        "warmup": warmup,
        "repeats": repeats,
        "variants": rows,
    }


# ----------------------------------------------------------------------------------------------- the table


COLUMNS = f"{'check':<10} {'case':<52} {'status':<6} result"


def print_row(check: str, case: str, status: str, result: str) -> None:
    print(f"{check:<10} {case:<52} {status:<6} {result}", flush=True)


def train_result(rec: dict[str, Any]) -> tuple[str, str]:
    """(status, result) of a training run: FAIL if it did not train, or a compiled run broke its graphs."""
    mfu = f"MFU {rec['mfu']:.1%}" if rec.get("mfu") is not None else "MFU -"
    text = f"{rec['step_ms_median']:.1f} ms/step, {rec['tokens_per_s']:,.0f} tok/s, {rec['tflops']:.3g} TFLOP/s, {mfu}"
    plan_gb = rec["predicted_peak"].get("total_gb")
    plan_text = f"plan {plan_gb:.2f} GB" if plan_gb is not None else "plan: " + rec["predicted_peak"]["error"][:60]
    if rec["peak_mem_gb"] is not None and plan_gb:
        plan_text = f"peak {rec['peak_mem_gb']:.2f} GB vs {plan_text} (x{rec['peak_mem_gb'] / plan_gb:.2f})"
    text += f", {plan_text}, loss {rec['loss_first']:.2f} -> {rec['loss_last']:.2f}"
    ok = all(v == v and abs(v) != float("inf") for v in rec["losses"].values())
    if "compiled" in rec:
        c = rec["compiled"]
        text += f", graphs {c['graphs']} breaks {c['graph_breaks']} recompiles {c['recompiles']}"
        ok = ok and c["graphs"] >= 1 and c["graph_breaks"] == 0
    return ("ok" if ok else "FAIL"), text


def print_layer(rec: dict[str, Any]) -> None:
    per_expert = rec["tokens_per_expert"]
    low, mean, high = (per_expert[k] for k in ("min", "mean", "max"))
    spread = f"{rec['dtype']}; tokens per expert: min {low:.0f}, mean {mean:.0f}, max {high:.0f}"
    print_row("layer", rec["shape"]["label"][:52], "info", spread)
    for row in rec["variants"]:
        syncs = "" if row["host_syncs"] is None else f", {row['host_syncs']} host syncs"
        result = f"{row['ms']:.2f} ms, {row['x_floor']:.2f} x floor, {row['expert_tflops']:.3g} expert TFLOP/s{syncs}"
        print_row("layer", f"  {row['variant']}", "ok", result)


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"cpu, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


# -------------------------------------------------------------------------------------------------- driver


class Report:
    """The JSON report, and whether anything failed; each section's records are added as they are made."""

    def __init__(self, header: dict[str, Any]) -> None:
        self.data: dict[str, Any] = {**header, "checks": [], "models": [], "layers": []}
        self.failed = False

    def attempt(self, section: str, what: dict[str, Any], fn: Callable[[], Any]) -> Any:
        """fn()'s record(s), or on an exception a record of the error (the other checks still run)."""
        try:
            return fn()
        except Exception as err:
            self.failed = True
            rec = {**what, "status": "FAIL", "error": first_line(err)}
            self.data[section].append(rec)
            print_row(what.get("check", section.rstrip("s")), str(what.get("case", ""))[:52], "FAIL", rec["error"])
            return None

    def check(self, rec: dict[str, Any]) -> None:
        self.data["checks"].append(rec)
        self.failed |= rec["status"] == "FAIL"
        print_row(rec["check"], rec["case"][:52], rec["status"], rec["detail"])


@contextlib.contextmanager
def free_after(device: torch.device) -> Iterator[None]:
    """Returns one check's memory before the next starts, and restores torch's determinism setting (a CPU
    trainer turns deterministic algorithms on for the whole process)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def first_contact(report: Report, device: torch.device, size: str, todo: Plan) -> None:
    """The first-contact checks (gpu_checks/contact.py), each guarded: one that raises is recorded as FAIL."""
    checks: list[tuple[dict[str, Any], Callable[[], Any]]] = [
        ({"check": "pipeline", "case": "torch API"}, pipeline_api),
        ({"check": "pipeline", "case": "pp2 bf16, 2 CPU ranks"}, partial(pipeline_run, 3)),
    ]
    for dtype in (torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.bfloat16,):
        what = {"check": "grouped_mm", "case": str(dtype).removeprefix("torch.")}
        checks.append((what, partial(grouped_mm_check, device, dtype, *todo.grouped_mm)))
    rows, seq = MIXTRAL_2.batch, MIXTRAL_2.seq_len
    checks.append(({"check": "h2d copy", "case": f"{rows}x{seq} batch"}, partial(h2d_check, device, rows, seq)))
    for shape in attention_shapes(size):
        checks.append(({"check": "attention", "case": shape.label}, partial(attention_check, shape, device)))
    for what, fn in checks:
        with free_after(device):
            out = report.attempt("checks", what, fn)
        for rec in [out] if isinstance(out, dict) else out or []:
            report.check(rec)


def training(
    report: Report, device: torch.device, runs: list[tuple[ModelCase, Variant]], steps: int, warmup: int
) -> None:
    for case, variant in runs:
        what = {"model": case.model.name, "precision": "autocast", "case": f"{case.model.name} {variant.label()}"}
        with free_after(device):
            rec = report.attempt(
                "models", what, lambda case=case, variant=variant: train_run(case, variant, device, steps, warmup)
            )
        if rec:
            report.data["models"].append(rec)
            status, result = train_result(rec)
            report.failed |= status == "FAIL"
            print_row("train", what["case"][:52], status, result)


def layers(report: Report, device: torch.device, shapes: list[Shape], warmup: int, repeats: int) -> None:
    hf_missing = report.data["transformers_skipped"]
    if hf_missing:
        print_row("layer", "transformers", "info", f"skipped: {hf_missing}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shape in shapes:
        with free_after(device):
            what = {"shape": {**asdict(shape), "label": str(shape)}, "case": str(shape)}
            rec = report.attempt(
                "layers", what, lambda shape=shape: layer_case(shape, device, dtype, warmup, repeats, not hf_missing)
            )
        if rec:
            report.data["layers"].append(rec)
            print_layer(rec)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes (the default without CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 3 steps, one compiled run: the CI smoke run")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run (the first --warmup untimed)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (model and layer)")
    parser.add_argument("--repeats", type=int, default=10, help="timed layer steps per variant")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU, robust on a shared machine)"
    )
    parser.add_argument("--skip", default="", help="comma list of sections to skip: contact, train, layer")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 2
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup={args.warmup} must be >= 1 and below --steps={args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs every check, printing rows as they come; returns 1 if any failed (each failure is recorded)."""
    args = parse_args(argv)
    start = time.perf_counter()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.threads or not cuda:
        # One thread by default on a CPU: several threads on busy cores slow a step down many times over
        # (benchmarks/README.md), and the measured peak (MFU) is per thread count.
        torch.set_num_threads(args.threads or 1)
    device = torch.device("cuda" if cuda else "cpu")
    size = "quick" if args.quick else "small" if args.small or not cuda else "full"
    todo, skip = plan(size), set(args.skip.split(","))
    hf_missing = transformers_available()
    peak = device_peak_tflops(device)
    report = Report(
        {
            "device": device_label(device),
            "size": size,
            "torch": torch.__version__,
            "transformers": None if hf_missing else importlib.metadata.version("transformers"),
            "peak_tflops": peak,
            "peak_is": "dense bf16, data sheet" if cuda else "measured fp32 GEMM",
            "transformers_skipped": hf_missing,
        }
    )
    peak_text = f"{peak:.4g} TFLOP/s ({report.data['peak_is']})" if peak else "unknown (no MFU)"
    print(f"GPU check: {report.data['device']}, torch {torch.__version__}, {size} shapes, peak {peak_text}")
    print(f"train: {args.steps} steps, median after {args.warmup}; layer: median of {args.repeats} after {args.warmup}")
    print(COLUMNS)
    if "contact" not in skip:
        first_contact(report, device, size, todo)
    if "train" not in skip:
        training(report, device, todo.runs, args.steps, args.warmup)
    if "layer" not in skip:
        layers(report, device, todo.layers, args.warmup, args.repeats)
    report.data["wall_s"] = time.perf_counter() - start
    print(f"\nwall time {report.data['wall_s']:.1f} s{'; some checks FAILED' if report.failed else ''}")
    if args.out:
        Path(args.out).write_text(json.dumps(report.data, indent=1))
        print(f"wrote {args.out}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
