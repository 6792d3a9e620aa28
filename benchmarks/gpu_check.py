"""One-GPU check: training throughput and MFU of two models, and one MoE layer against its floor and peers.

  models  the debug model and a 2-block cut of Mixtral-8x7B (dim 4096, 8 experts of hidden 14336, top-2,
          GQA 32/8 heads, vocab 32000, 2 sequences of 4096), each for --warmup untimed then --steps timed
          training steps: forward, fp32 cross-entropy, backward, gradient clipping, fused AdamW
          (train.optim.build_optimizer, as the trainer builds it). Precisions:
            autocast  fp32 master weights under bf16 autocast: what train.dtype=bf16 runs
            bf16      bf16 weights and optimizer state, no fp32 masters: the same kernels without casts
            fp32      plain fp32 (the CPU default)
          Tokens/s, model TFLOP/s (profiling/flops.py: matmul FLOPs of the active parameters, x3 for
          training) and MFU (profiling.profiler.throughput) against the dense bf16 peak of the GPU named by
          torch.cuda.get_device_name (989 TFLOP/s for H100 SXM and H200), or on CPU the measured fp32 GEMM rate.
  layers  one MoE layer, forward+backward, at the Mixtral-8x7B layer shape and the DeepSeek-V3 layer shape
          (dim 7168, 256 routed experts of hidden 2048 + 1 shared, top-8 sigmoid routing limited to 4 of 8
          groups), 8192 tokens each: the grouped_mm floor, our layer and transformers' block with our weights
          (benchmarks/moe_layer.py builds them). "expert TFLOP/s" is the routed experts' fwd+bwd matmul FLOPs
          over the time: the floor's achieved rate, an effective rate for the others. On CUDA also the host
          synchronisations of one step (torch.cuda.set_sync_debug_mode).

Weights come from torch's generator with moe.init.init_rule's per-parameter std (ones for norms): the same
distribution as the trainer's counter-based init, which generates in small blocks and would take minutes for
3 B parameters. The token batch is random and fixed; data loading is not timed. Training steps are timed with
CUDA events around each step and one synchronisation at the end (the wall clock on CPU); layer steps as in
moe_layer.py, synchronising around each. Layers run with bf16 weights on CUDA, fp32 on CPU.

Nothing here imports Hydra or OmegaConf (launch/ does at import, and train.trainer through train.callbacks),
so the GPU machine needs no wheels carried. Run there from the repo root (estimated 2 to 4 minutes on one
H100/H200, most of it start-up and the fp32-master Mixtral cut):
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json
Without CUDA it runs small shapes (or pass --small); --quick is the seconds-long smoke run the tests use:
    .venv/bin/python benchmarks/gpu_check.py [--quick] [--out gpu_check.json]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from moe_layer import Shape, time_steps, transformers_available, variants  # the sibling script (sys.path[0])

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.init import init_rule
from moeyard.moe.model import Transformer
from moeyard.profiling.flops import device_peak_tflops, peak_memory_gb, train_flops_per_token
from moeyard.profiling.profiler import throughput
from moeyard.train.optim import OptimConfig, build_optimizer


@dataclass(frozen=True)
class ModelCase:
    """A model to train and its batch: `batch` sequences of `seq_len` tokens per step."""

    model: ModelConfig
    moe: MoEConfig
    batch: int
    seq_len: int


DEBUG = ModelCase(model=ModelConfig(), moe=MoEConfig(expert_hidden=32), batch=8, seq_len=128)  # conf/model/debug
MIXTRAL_2 = ModelCase(
    model=ModelConfig(
        name="mixtral_8x7b_2blocks",
        vocab_size=32000,
        dim=4096,
        n_layers=2,
        n_heads=32,
        n_kv_heads=8,
        ffn_hidden=14336,
        max_seq_len=4096,
        rope_theta=1e6,
    ),
    moe=MoEConfig(num_experts=8, top_k=2, expert_hidden=14336, aux_loss_coef=0.02, z_loss_coef=0.001),
    batch=2,
    seq_len=4096,
)
MIXTRAL_LAYER = Shape(tokens=8192, dim=4096, experts=8, top_k=2, hidden=14336)
DEEPSEEK_LAYER = Shape(
    tokens=8192,
    dim=7168,
    experts=256,
    top_k=8,
    hidden=2048,
    router="sigmoid_topk",
    groups=8,
    topk_groups=4,
    shared=1,
    route_scale=2.5,
)


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


def plan(size: str) -> tuple[list[ModelCase], list[Shape]]:
    """The models and layer shapes at `size`: full (GPU), small (CPU) or quick (smoke test)."""
    if size == "full":
        return [DEBUG, MIXTRAL_2], [MIXTRAL_LAYER, DEEPSEEK_LAYER]
    if size == "small":
        models = [DEBUG, small(MIXTRAL_2, dim=256, hidden=512, seq_len=256, batch=4)]
        layers = [layer_small(MIXTRAL_LAYER, 1024, 256, 8, 512), layer_small(DEEPSEEK_LAYER, 1024, 256, 64, 128)]
        return models, layers
    debug = replace(DEBUG, batch=2, seq_len=32)
    models = [debug, small(MIXTRAL_2, dim=64, hidden=64, seq_len=64, batch=2)]
    return models, [layer_small(MIXTRAL_LAYER, 128, 64, 8, 64), layer_small(DEEPSEEK_LAYER, 128, 64, 32, 32)]


# ---------------------------------------------------------------------------------------------------- models


@torch.no_grad()
def build_model(case: ModelCase, device: torch.device, precision: str, seed: int = 0) -> Transformer:
    """The model built on the meta device, then allocated on `device` and filled there (see the docstring)."""
    with torch.device("meta"):
        model = Transformer(case.model, case.moe)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for fqn, param in model.named_parameters():
        rule = init_rule(fqn, param.ndim, case.model)
        if rule == "ones":
            param.fill_(1.0)
        elif rule == "zeros":
            param.zero_()
        else:
            param.normal_(0.0, rule, generator=gen)
    for layer in model.moe_layers().values():
        layer.router.expert_bias.zero_()
    if precision == "bf16":
        model.to(torch.bfloat16)
    model.reset_buffers(device)  # the RoPE table, in fp32 whatever the weights' dtype
    return model


def time_ms(fn: Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Milliseconds of each of `n` back-to-back calls: CUDA events with one synchronisation at the end on GPU
    (no host sync between steps but the code's own), the wall clock on CPU."""
    if device.type != "cuda":
        out = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
        return out
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    events[0].record()
    for event in events[1:]:
        fn()
        event.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(events, events[1:], strict=False)]


def train_case(case: ModelCase, device: torch.device, precision: str, steps: int, warmup: int) -> dict[str, Any]:
    """Trains `case` for warmup + steps steps; returns its throughput record."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(case, device, precision)
    optim = OptimConfig(fused="auto")  # fused on CUDA, foreach elsewhere: as the trainer does
    opt = build_optimizer(list(model.named_parameters()), optim, device)
    params = [p for p in model.parameters() if p.requires_grad]
    moe_layers = list(model.moe_layers().values())
    gen = torch.Generator(device=device).manual_seed(1)
    tokens = torch.randint(case.model.vocab_size, (case.batch, case.seq_len + 1), generator=gen, device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses: list[torch.Tensor] = []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast"):
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for layer in moe_layers:
            layer.drain_stats()
        losses.append(loss.detach())

    time_ms(step, warmup, device)
    ms = time_ms(step, steps, device)
    tokens_per_s = case.batch * case.seq_len * steps / (sum(ms) / 1e3)
    flops_per_token = train_flops_per_token(case.model, case.moe, case.seq_len)
    rates = throughput(tokens_per_s, 1, flops_per_token, device_peak_tflops(device))
    return {
        "model": case.model.name,
        "model_config": asdict(case.model),  # the shapes `moeyard plan --calibration` predicts this run from
        "moe_config": asdict(case.moe),
        "precision": precision,
        "batch": case.batch,
        "seq_len": case.seq_len,
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps,
        "warmup": warmup,
        "step_ms_median": statistics.median(ms),
        "step_ms_mean": sum(ms) / len(ms),
        "tokens_per_s": tokens_per_s,
        "train_flops_per_token": flops_per_token,
        "tflops": rates["tflops_per_device"],
        "mfu": rates.get("mfu"),
        "peak_mem_gb": peak_memory_gb(device),
        "loss_first": losses[0].item(),
        "loss_last": losses[-1].item(),
    }


# ---------------------------------------------------------------------------------------------------- layers


def host_syncs(step: Callable[[], None], device: torch.device) -> int | None:
    """Host synchronisations one call of `step` makes (CUDA only: the sync debug mode warns on each)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


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


# ---------------------------------------------------------------------------------------------------- report


def free(device: torch.device) -> None:
    """Returns the last case's memory before the next one is built."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


MODEL_HEADER = (
    f"{'model':<28} {'precision':<9} {'BxS':>9} {'params M':>9} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>8}"
    f" {'MFU':>6} {'peak GB':>8}  loss"
)


def print_model(rec: dict[str, Any]) -> None:
    if "error" in rec:
        print(f"{rec['model']:<28} {rec['precision']:<9} FAILED: {rec['error']}")
        return
    mfu = f"{rec['mfu']:.1%}" if rec.get("mfu") is not None else "-"
    print(
        f"{rec['model']:<28} {rec['precision']:<9} {rec['batch']:>3}x{rec['seq_len']:<5} {rec['params'] / 1e6:>9.1f}"
        f" {rec['step_ms_median']:>9.2f} {rec['tokens_per_s']:>11.0f} {rec['tflops']:>8.3g} {mfu:>6}"
        f" {rec['peak_mem_gb']:>8.2f}  {rec['loss_first']:.2f} -> {rec['loss_last']:.2f}"
    )


def print_layer(rec: dict[str, Any]) -> None:
    if "error" in rec:
        print(f"{rec['shape']['label']:<60} FAILED: {rec['error']}")
        return
    for i, row in enumerate(rec["variants"]):
        label = rec["shape"]["label"] if i == 0 else ""
        syncs = "-" if row["host_syncs"] is None else str(row["host_syncs"])
        print(
            f"{label:<60} {row['variant']:<24} {row['ms']:>9.2f} {row['x_floor']:>8.2f}"
            f" {row['expert_tflops']:>14.3g} {syncs:>6}"
        )
    per_expert = rec["tokens_per_expert"]
    low, mean, high = (per_expert[k] for k in ("min", "mean", "max"))
    print(f"{'':<60} tokens per expert: min {low:.0f}, mean {mean:.0f}, max {high:.0f}")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes (the default without CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps: a smoke run for the tests")
    parser.add_argument(
        "--precision",
        default=None,
        help="comma list of autocast,bf16,fp32 (default: autocast,bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (model and layer)")
    parser.add_argument("--repeats", type=int, default=10, help="timed layer steps per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-models", action="store_true", help="skip the training runs")
    parser.add_argument("--no-layers", action="store_true", help="skip the layer timings")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 2, 1, 2
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs every case, printing as it goes; returns 1 if any case failed (each failure is recorded)."""
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    size = "quick" if args.quick else "small" if args.small or not cuda else "full"
    precisions = (args.precision or ("autocast,bf16" if cuda else "fp32")).split(",")
    layer_dtype = torch.bfloat16 if cuda else torch.float32
    model_cases, layer_shapes = plan(size)
    hf_missing = transformers_available()
    peak = device_peak_tflops(device)
    report: dict[str, Any] = {
        "device": device_label(device),
        "size": size,
        "torch": torch.__version__,
        "transformers": None if hf_missing else importlib.metadata.version("transformers"),
        "peak_tflops": peak,
        "peak_is": "dense bf16, data sheet" if cuda else "measured fp32 GEMM",
        "transformers_skipped": hf_missing,
        "models": [],
        "layers": [],
    }
    peak_text = f"{peak:.4g} TFLOP/s ({report['peak_is']})" if peak else "unknown (no MFU)"
    print(f"GPU check: {report['device']}, {size} shapes, peak {peak_text}")
    failed = False
    if not args.no_models:
        print(f"\ntraining: {args.steps} timed steps after {args.warmup} warmup, fused AdamW where CUDA")
        print(MODEL_HEADER)
        for case in model_cases:
            for precision in precisions:
                try:
                    rec = train_case(case, device, precision, args.steps, args.warmup)
                except Exception as err:  # one failed case is reported, the others still run
                    rec, failed = {"model": case.model.name, "precision": precision, "error": repr(err)}, True
                report["models"].append(rec)
                print_model(rec)
                free(device)
    if not args.no_layers:
        dtype_name = str(layer_dtype).removeprefix("torch.")
        print(f"\nMoE layer forward+backward, {dtype_name}: median of {args.repeats} after {args.warmup} warmup")
        if hf_missing:
            print(f"transformers skipped: {hf_missing}")
        print(f"{'shape':<60} {'variant':<24} {'ms':>9} {'x floor':>8} {'expert TFLOP/s':>14} {'syncs':>6}")
        for shape in layer_shapes:
            try:
                rec = layer_case(shape, device, layer_dtype, args.warmup, args.repeats, hf=not hf_missing)
            except Exception as err:
                rec, failed = {"shape": {**asdict(shape), "label": str(shape)}, "error": repr(err)}, True
            report["layers"].append(rec)
            print_layer(rec)
            free(device)
    report["wall_s"] = time.perf_counter() - start
    print(f"\nwall time {report['wall_s']:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
