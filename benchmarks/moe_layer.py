"""Forward+backward time of our MoE layer against the grouped-matmul floor and DeepSpeed's MoE layer.

For each shape (T tokens, D model dim, E experts, K top-k, F expert hidden) and one seeded set of weights:
  floor          the bare expert work of the same routing: SwiGLU as three torch grouped_mm calls on tokens
                 already sorted by expert (no router, no permutation, no combine). Nothing can beat it.
  ours grouped   moe.layer.MoELayer, dropless, experts as grouped_mm (the default).
  ours looped    the same layer with one matmul per expert (moe.grouped_mm=off), for reference.
  deepspeed      deepspeed.moe.layer.MoE, ep_size=1, drop_tokens=False, an nn.Module SwiGLU expert, our
                 weights copied in (so it routes the same tokens to the same experts).
Every variant runs forward and backward (input and weight gradients). Variants take turns within each
repeat, so drift on a shared machine hits them alike; the table shows the median and the ratio to the floor.

Run: .venv/bin/python benchmarks/moe_layer.py [--quick] [--repeats N] [--threads N] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moe.config import MoEConfig
from moe.dispatcher import LocalDispatcher
from moe.layer import MoELayer, SwiGLU

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """One benchmark case; D and F are multiples of 8 (grouped_mm wants 16-byte aligned rows)."""

    tokens: int
    dim: int
    experts: int
    top_k: int
    hidden: int

    def __str__(self) -> str:
        return f"T={self.tokens} D={self.dim} E={self.experts} K={self.top_k} F={self.hidden}"


SHAPES = [
    Shape(tokens=2048, dim=256, experts=8, top_k=2, hidden=512),
    Shape(tokens=2048, dim=512, experts=8, top_k=2, hidden=1024),
    Shape(tokens=4096, dim=256, experts=32, top_k=2, hidden=256),
    Shape(tokens=2048, dim=256, experts=64, top_k=1, hidden=256),
]
QUICK_SHAPES = [Shape(tokens=256, dim=64, experts=8, top_k=2, hidden=64)]
SEQ_LEN = 256
"""Tokens per sequence; T/SEQ_LEN sequences per batch (routing is per token, so this only sets the view)."""

Step = Callable[[], None]


def our_layer(shape: Shape, grouped_mm: str, device: torch.device, dtype: torch.dtype) -> MoELayer:
    """Our layer with seeded weights (the same for every variant of a shape)."""
    cfg = MoEConfig(
        num_experts=shape.experts,
        top_k=shape.top_k,
        expert_hidden=shape.hidden,
        norm_topk_prob=shape.top_k > 1,
        grouped_mm=grouped_mm,
    )
    layer = MoELayer(shape.dim, cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.randn(shape.experts, shape.dim, generator=gen) / shape.dim**0.5)
        for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2):
            w.copy_(torch.randn(w.shape, generator=gen) / w.shape[1] ** 0.5)
    return layer.to(device=device, dtype=dtype)


def layer_step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Step:
    """One forward+backward of a layer returning out (ours) or (out, l_aux, counts) (DeepSpeed)."""

    def step() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)
        if isinstance(layer, MoELayer):
            layer.drain_stats()

    return step


def floor_step(ours: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> Step:
    """The expert SwiGLU of `ours`' routing as three grouped matmuls on pre-sorted tokens."""
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    with torch.no_grad():
        routing = ours.router(x)
        x_ND, counts_E, meta = LocalDispatcher(ours.cfg.num_experts).dispatch(x.flatten(0, 1), routing)
        grad_ND = grad.flatten(0, 1)[routing.token_idx_A[meta.sort_order_A]].contiguous()
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    x_ND = x_ND.contiguous().requires_grad_(True)
    experts = ours.experts
    weights = [w.detach().clone().requires_grad_(True) for w in (experts.w1, experts.w3, experts.w2)]

    def step() -> None:
        x_ND.grad = None
        for w in weights:
            w.grad = None
        w1, w3, w2 = weights
        h_NF = F.silu(grouped_mm(x_ND, w1, offs=offsets_E)) * grouped_mm(x_ND, w3, offs=offsets_E)
        grouped_mm(h_NF, w2, offs=offsets_E).backward(grad_ND)

    return step


def init_deepspeed(device: torch.device) -> None:
    """One-rank process group plus DeepSpeed's comm layer (first call JIT-compiles a small op, cached)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    import deepspeed
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)


def deepspeed_layer(ours: MoELayer, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """deepspeed.moe.layer.MoE at `ours`' shapes, dropless, deterministic gating, `ours`' weights."""
    from deepspeed.moe.layer import MoE

    cfg, dim = ours.cfg, ours.router.gate.weight.shape[1]
    ds = MoE(
        dim,
        SwiGLU(dim, cfg.expert_hidden),
        num_experts=cfg.num_experts,
        ep_size=1,
        k=cfg.top_k,
        min_capacity=0,
        drop_tokens=False,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints a line when it creates the ep group
        ds.set_deepspeed_parallelism()
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.gate.weight)
        for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            for name in ("w1", "w3", "w2"):
                getattr(expert, name).weight.copy_(getattr(ours.experts, name)[e].T)
    return ds.to(device=device, dtype=dtype)


def variants(shape: Shape, device: torch.device, dtype: torch.dtype, with_ds: bool) -> dict[str, Step]:
    """The steps to time for one shape, all on the same tokens and weights."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape.tokens // SEQ_LEN or 1, min(SEQ_LEN, shape.tokens), shape.dim, generator=gen)
    grad = torch.randn(x.shape, generator=gen)
    x, grad = (t.to(device=device, dtype=dtype) for t in (x, grad))
    x.requires_grad_(True)
    ours = our_layer(shape, "on", device, dtype)
    steps = {
        "floor (grouped_mm)": floor_step(ours, x, grad),
        "ours grouped_mm": layer_step(ours, x, grad),
        "ours looped": layer_step(our_layer(shape, "off", device, dtype), x, grad),
    }
    if with_ds:
        steps["deepspeed MoE"] = layer_step(deepspeed_layer(ours, device, dtype), x, grad)
    return steps


def time_steps(steps: dict[str, Step], warmup: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Median ms per step; the variants take turns in every repeat."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def deepspeed_available(device: torch.device) -> str | None:
    """None when DeepSpeed's MoE can run here, else why not."""
    try:
        init_deepspeed(device)
    except ImportError as err:
        return f"deepspeed not installed ({err.name}); pip install 'moeyard[peers]'"
    return None


def load_note(device: torch.device) -> str:
    """The 1-minute load average on a CPU run: the machine may be shared, and timings with it."""
    return f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if device.type == "cpu" else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 1 warmup, 3 repeats")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed column")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ds_missing = "--no-deepspeed" if args.no_deepspeed else deepspeed_available(device)
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"MoE layer forward+backward: {where}, {args.dtype}, "
        f"median of {args.repeats} after {args.warmup} warmup{load_note(device)}"
    )
    if ds_missing:
        print(f"deepspeed MoE skipped: {ds_missing}")
    print(f"{'shape':<34} {'variant':<20} {'ms':>9} {'x floor':>8}")
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        torch.manual_seed(0)
        ms = time_steps(variants(shape, device, dtype, not ds_missing), args.warmup, args.repeats, device)
        floor = ms["floor (grouped_mm)"]
        for i, (name, value) in enumerate(ms.items()):
            print(f"{str(shape) if i == 0 else '':<34} {name:<20} {value:>9.2f} {value / floor:>8.2f}")


if __name__ == "__main__":
    main()
