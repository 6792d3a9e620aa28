"""Forward+backward time of our MoE layer against the grouped-matmul floor and peer MoE layers.

For each shape (T tokens, D model dim, E experts, K top-k, F expert hidden) and one seeded set of weights:
  floor          the bare expert work of the same routing: SwiGLU as three torch grouped_mm calls on tokens
                 already sorted by expert (no router, no permutation, no combine), with autograd's backward.
  ours grouped   moe.layer.MoELayer, dropless, experts as grouped_mm (the default); on CPU its experts and
                 combine have hand-written backward passes (moe/experts.py, moe/combine.py), so its expert
                 part alone can run below the floor.
  ours looped    the same layer with one matmul per expert (moe.grouped_mm=off), for reference.
  ours compiled  with --compile only: the grouped layer under torch.compile, as parallel.compile=true compiles
                 each block (plain ops for inductor to fuse, no hand-written backward; fp32 grouped_mm runs
                 eager between compiled pieces, as moe/experts.py says). Its first warmup step compiles
                 (seconds); the peers stay eager.
  deepspeed      deepspeed.moe.layer.MoE, ep_size=1, drop_tokens=False, an nn.Module SwiGLU expert, our
                 weights copied in (so it routes the same tokens to the same experts).
  transformers   Hugging Face's MixtralSparseMoeBlock (DeepseekV3MoE for sigmoid-routed shapes), our weights
                 copied into its fused [E, 2F, D] gate_up / [E, D, F] down layout, run with its
                 `grouped_mm` experts implementation (what from_pretrained picks where grouped_mm exists)
                 and its `eager` one (a Python loop over the experts hit).
Every variant runs forward and backward (input and weight gradients). Variants take turns within each
repeat, so drift on a shared machine hits them alike; the table shows the median ms and the median over
repeats of the time over the floor's in the same repeat ("x floor"). On CPU it also shows the median minor
page faults of a step ("faults"): glibc hands large freed blocks back to the OS, and an allocation it must
take from the OS again costs a fresh page for every 4 KiB written. Which variant pays depends on what ran
before it in the process as much as on its own allocations (the same step can take 0 or 4,096 faults), so a
variant's time with many faults is partly the allocator's. To time every variant on a heap that keeps what
it freed, run with GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=17179869184.
Our layer also computes its balancing losses and routing statistics; the peers' blocks compute none (Hugging
Face computes the aux loss once per model from the router logits), so that work is counted against ours.

Run: .venv/bin/python benchmarks/moe_layer.py [--quick] [--repeats N] [--threads N] [--device auto|cpu|cuda]
     [--shapes 0,4] [--no-deepspeed] [--no-transformers] [--compile]; the fine-grained shape (index 4) weighs
     routing and permutation most; benchmarks/profile_layer.py breaks our layer's time there down by phase.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.layer import MoELayer, SwiGLU
from moeyard.moe.presets import ROUTINGS
from moeyard.train.spawn import free_port

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """One benchmark case; D and F are multiples of 8 (grouped_mm wants 16-byte aligned rows).

    The routing fields default to Mixtral's (softmax top-k, no groups, no shared expert).
    """

    tokens: int
    dim: int
    experts: int
    top_k: int
    hidden: int
    router: str = "softmax_topk"
    groups: int = 1
    topk_groups: int = 1
    shared: int = 0
    route_scale: float = 1.0

    @classmethod
    def of(cls, model: ModelConfig, moe: MoEConfig, tokens: int) -> Shape:
        """One MoE layer of a model preset (moe/presets.py), on `tokens` tokens."""
        return cls(
            tokens=tokens,
            dim=model.dim,
            experts=moe.num_experts,
            top_k=moe.top_k,
            hidden=moe.expert_hidden,
            router=moe.router,
            groups=moe.n_groups,
            topk_groups=moe.topk_groups,
            shared=moe.num_shared_experts,
            route_scale=moe.route_scale,
        )

    def __str__(self) -> str:
        out = f"T={self.tokens} D={self.dim} E={self.experts} K={self.top_k} F={self.hidden}"
        if self.router != "softmax_topk":
            out += f" {self.router.split('_')[0]}"
        if self.groups > 1:
            out += f" groups {self.topk_groups}/{self.groups}"
        return out + (f" +{self.shared} shared" if self.shared else "")

    def expert_flops(self) -> int:
        """Forward+backward FLOPs of the routed experts alone: 3 matmuls of 2*D*F per assignment, x3 for
        backward (input and weight gradients). The floor does exactly this work."""
        return 3 * 2 * 3 * self.tokens * self.top_k * self.dim * self.hidden


SHAPES = [
    Shape(tokens=2048, dim=256, experts=8, top_k=2, hidden=512),
    Shape(tokens=2048, dim=512, experts=8, top_k=2, hidden=1024),
    Shape(tokens=4096, dim=256, experts=32, top_k=2, hidden=256),
    Shape(tokens=2048, dim=256, experts=64, top_k=1, hidden=256),
    # Fine-grained (DeepSeek-like proportions): many small experts, K=8, so routing and permutation work
    # (per assignment) weighs most against the expert matmuls (per assignment x F).
    Shape(tokens=4096, dim=256, experts=64, top_k=8, hidden=128),
]
QUICK_SHAPES = [Shape(tokens=256, dim=64, experts=8, top_k=2, hidden=64)]
SEQ_LEN = 256
"""Tokens per sequence; T/SEQ_LEN sequences per batch (routing is per token, so this only sets the view)."""

Step = Callable[[], None]


def moe_config(shape: Shape, grouped_mm: str) -> MoEConfig:
    """Our dropless layer config for `shape`: sigmoid-routed shapes balance as DeepSeek-V3 does (the
    `deepseek` recipe of moe/presets.py), softmax-routed ones with the default losses."""
    balancing = dict(ROUTINGS["deepseek"].moe) if shape.router == "sigmoid_topk" else {}
    balancing.pop("router", None)  # the shape names its router below
    return MoEConfig(
        **balancing,
        num_experts=shape.experts,
        top_k=shape.top_k,
        expert_hidden=shape.hidden,
        num_shared_experts=shape.shared,
        router=shape.router,
        norm_topk_prob=shape.top_k > 1,
        route_scale=shape.route_scale,
        n_groups=shape.groups,
        topk_groups=shape.topk_groups,
        grouped_mm=grouped_mm,
    )


@torch.no_grad()
def our_layer(shape: Shape, grouped_mm: str, device: torch.device, dtype: torch.dtype) -> MoELayer:
    """Our layer with seeded weights (the same for every variant of a shape).

    Built on the meta device and filled in place on `device`, so a DeepSeek-V3-sized layer (11 B expert
    parameters) never exists in fp32 or on the host. Each matrix is N(0, 1/fan_in), fan_in = shape[1] for
    both nn.Linear [out, in] and expert [E, in, out] weights.
    """
    with torch.device("meta"):
        layer = MoELayer(shape.dim, moe_config(shape, grouped_mm))
    layer = layer.to(dtype=dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for param in layer.parameters():
        param.normal_(0.0, param.shape[1] ** -0.5, generator=gen)
    layer.router.expert_bias.zero_()
    return layer


def layer_step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Step:
    """One forward+backward of a layer returning out (ours) or (out, l_aux, counts) (DeepSpeed)."""

    def step() -> None:
        out = layer(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)
        if isinstance(layer, MoELayer):
            layer.drain_stats()
        # Freed here rather than at the next step's start: only one variant's gradients are alive at a
        # time, which is what lets the DeepSeek-V3 shape's variants share one GPU.
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def floor_step(ours: MoELayer, x: torch.Tensor, grad: torch.Tensor) -> Step:
    """The expert SwiGLU of `ours`' routing as three grouped matmuls on pre-sorted tokens.

    The weights are `ours`' own storage (detached leaves): no copy, so large shapes fit.
    """
    grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    with torch.no_grad():
        # Sorted here from the Routing alone (not through the dispatcher), so the floor stays the same
        # whatever the dispatcher does. Dropless: every assignment is kept; any dropped (id E) sort last.
        routing = ours.router(x)
        counts_E = routing.kept_E
        order_N = routing.expert_idx_A.argsort(stable=True)[: int(counts_E.sum())]
        token_N = routing.token_idx_A[order_N]
        x_ND, grad_ND = x.flatten(0, 1)[token_N], grad.flatten(0, 1)[token_N].contiguous()
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    x_ND = x_ND.contiguous().requires_grad_(True)
    experts = ours.experts
    weights = [w.detach().requires_grad_(True) for w in (experts.w1, experts.w3, experts.w2)]

    def step() -> None:
        w1, w3, w2 = weights
        h_NF = F.silu(grouped_mm(x_ND, w1, offs=offsets_E)) * grouped_mm(x_ND, w3, offs=offsets_E)
        grouped_mm(h_NF, w2, offs=offsets_E).backward(grad_ND)
        x_ND.grad = None
        for w in weights:
            w.grad = None

    return step


@torch.no_grad()
def hf_block(ours: MoELayer, shape: Shape, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' MoE block at `shape` holding `ours`' weights (the same experts, the same router).

    MixtralSparseMoeBlock for softmax routing; DeepseekV3MoE (sigmoid scores, group limit, shared expert,
    routed scaling) for sigmoid routing. Its experts store gate and up fused as gate_up_proj [E, 2F, D] and
    down_proj [E, D, F], i.e. the transposes of our w1|w3 [E, D, F] and w2 [E, F, D].
    """
    if shape.router == "sigmoid_topk":
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        config = DeepseekV3Config(
            hidden_size=shape.dim,
            moe_intermediate_size=shape.hidden,
            n_routed_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
            n_shared_experts=shape.shared,
            n_group=shape.groups,
            topk_group=shape.topk_groups,
            routed_scaling_factor=shape.route_scale,
            norm_topk_prob=shape.top_k > 1,
        )
        make = DeepseekV3MoE
    else:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        config = MixtralConfig(
            hidden_size=shape.dim,
            intermediate_size=shape.hidden,
            num_local_experts=shape.experts,
            num_experts_per_tok=shape.top_k,
            router_jitter_noise=0.0,
        )
        make = MixtralSparseMoeBlock
    with torch.device("meta"):
        block = make(config)
    block = block.to(dtype=dtype).to_empty(device=device)
    hidden = shape.hidden
    block.gate.weight.copy_(ours.router.gate.weight)
    if hasattr(block.gate, "e_score_correction_bias"):
        block.gate.e_score_correction_bias.zero_()
    block.experts.gate_up_proj[:, :hidden].copy_(ours.experts.w1.transpose(1, 2))
    block.experts.gate_up_proj[:, hidden:].copy_(ours.experts.w3.transpose(1, 2))
    block.experts.down_proj.copy_(ours.experts.w2.transpose(1, 2))
    if shape.shared:
        mlp, shared = block.shared_experts, ours.shared_experts
        for theirs, mine in ((mlp.gate_proj, shared.w1), (mlp.up_proj, shared.w3), (mlp.down_proj, shared.w2)):
            theirs.weight.copy_(mine.weight)
    return block


def hf_step(block: torch.nn.Module, impl: str, x: torch.Tensor, grad: torch.Tensor) -> Step:
    """layer_step of `block` with its experts run by transformers' `impl` ("grouped_mm", "eager", ...).

    The implementation is read from the experts' config at each forward, so one block (one copy of the
    weights) serves every implementation.
    """
    run = layer_step(block, x, grad)

    def step() -> None:
        if hasattr(block.experts, "config"):  # else a transformers that only has the eager loop
            block.experts.config._experts_implementation = impl
        run()

    return step


def init_deepspeed(device: torch.device) -> None:
    """One-rank process group plus DeepSpeed's comm layer (first call JIT-compiles a small op, cached)."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    import deepspeed
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
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


HF_IMPLS = ("grouped_mm", "eager")
"""transformers experts implementations timed: its grouped_mm path and its per-expert Python loop."""


def layer_input(shape: Shape, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded input x [B, S, D] (requires grad) and output gradient for `shape`, B*S = T."""
    gen = torch.Generator(device=device).manual_seed(1)
    B, S = shape.tokens // SEQ_LEN or 1, min(SEQ_LEN, shape.tokens)
    x = torch.randn(B, S, shape.dim, generator=gen, device=device, dtype=dtype)
    grad = torch.randn(x.shape, generator=gen, device=device, dtype=dtype)
    return x.requires_grad_(True), grad


def variants(
    shape: Shape,
    device: torch.device,
    dtype: torch.dtype,
    with_ds: bool,
    hf_impls: tuple[str, ...] = HF_IMPLS,
    looped: bool = True,
    compiled: bool = False,
) -> tuple[dict[str, Step], torch.Tensor]:
    """The steps to time for one shape, all on the same tokens and weights, and the tokens per expert
    (int64 [E]) of our routing, which the floor's groups have."""
    x, grad = layer_input(shape, device, dtype)
    ours = our_layer(shape, "on", device, dtype)
    with torch.no_grad():
        counts_E = ours.router(x).kept_E
    steps = {"floor (grouped_mm)": floor_step(ours, x, grad), "ours grouped_mm": layer_step(ours, x, grad)}
    if looped:
        steps["ours looped"] = layer_step(our_layer(shape, "off", device, dtype), x, grad)
    if compiled:
        layer = our_layer(shape, "on", device, dtype)
        layer.compile()
        steps["ours compiled"] = layer_step(layer, x, grad)
    if with_ds and shape.router == "softmax_topk" and not shape.shared:
        steps["deepspeed MoE"] = layer_step(deepspeed_layer(ours, device, dtype), x, grad)
    if hf_impls:
        block = hf_block(ours, shape, device, dtype)
        # A transformers without experts implementations stores no config on the experts and always runs
        # its eager loop: then only that row is honest.
        for impl in hf_impls if hasattr(block.experts, "config") else ("eager",):
            steps[f"transformers {impl}"] = hf_step(block, impl, x, grad)
    return steps, counts_E


def time_steps(steps: dict[str, Step], warmup: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Median ms per step; the variants take turns in every repeat."""
    return {name: statistics.median(ts) for name, ts in time_repeats(steps, warmup, repeats, device).items()}


def paired_ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    """Each variant's median over repeats of its time over `base`'s in the same repeat: a slowdown of the
    machine that lasts a repeat cancels out, where a ratio of medians would let it tip either way."""
    return {name: statistics.median(t / b for t, b in zip(ts, times[base], strict=True)) for name, ts in times.items()}


def time_repeats(
    steps: dict[str, Step], warmup: int, repeats: int, device: torch.device, faults: dict[str, list[int]] | None = None
) -> dict[str, list[float]]:
    """ms of each step in each repeat; the variants take turns in every repeat. `faults`, when given, gets
    each step's minor page faults (this process's, read around the step) under the step's name."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            faults_before = minor_faults()
            t0 = time.perf_counter()
            step()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
            if faults is not None:
                faults.setdefault(name, []).append(minor_faults() - faults_before)
    return times


def minor_faults() -> int:
    """Minor page faults of this process so far (pages the OS mapped in on first touch)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def deepspeed_available(device: torch.device) -> str | None:
    """None when DeepSpeed's MoE can run here, else why not."""
    try:
        init_deepspeed(device)
    except ImportError as err:
        return f"deepspeed not installed ({err.name}); pip install 'moeyard[peers]'"
    return None


def transformers_available() -> str | None:
    """None when transformers' Mixtral and DeepSeek-V3 MoE blocks can be imported, else why not."""
    try:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: F401
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: F401
    except ImportError as err:
        return f"transformers not installed or too old ({err}); pip install 'moeyard[peers]'"
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
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed rows")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers rows")
    parser.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    parser.add_argument("--compile", action="store_true", help="add our layer under torch.compile")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.repeats = 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ds_missing = "--no-deepspeed" if args.no_deepspeed else deepspeed_available(device)
    hf_missing = "--no-transformers" if args.no_transformers else transformers_available()
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"MoE layer forward+backward: {where}, {args.dtype}, "
        f"median of {args.repeats} after {args.warmup} warmup{load_note(device)}"
    )
    if ds_missing:
        print(f"deepspeed MoE skipped: {ds_missing}")
    if hf_missing:
        print(f"transformers skipped: {hf_missing}")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [shapes[int(i)] for i in args.shapes.split(",")]
    faults_column = f" {'faults':>8}" if device.type == "cpu" else ""
    print(f"{'shape':<34} {'variant':<24} {'ms':>9} {'x floor':>8}{faults_column}")
    for shape in shapes:
        torch.manual_seed(0)
        hf_impls = () if hf_missing else HF_IMPLS
        steps, _ = variants(shape, device, dtype, not ds_missing, hf_impls, compiled=args.compile)
        faults: dict[str, list[int]] = {}
        times = time_repeats(steps, args.warmup, args.repeats, device, faults if faults_column else None)
        ratios = paired_ratios(times, "floor (grouped_mm)")
        for i, (name, ts) in enumerate(times.items()):
            row = f"{str(shape) if i == 0 else '':<34} {name:<24} {statistics.median(ts):>9.2f} {ratios[name]:>8.2f}"
            print(row + (f" {statistics.median(faults[name]):>8.0f}" if faults_column else ""))


if __name__ == "__main__":
    main()
