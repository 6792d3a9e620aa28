"""First-contact checks: what the installed torch does on this device where MoEyard's GPU path meets it.

Each check returns a record {"check", "case", "status", "detail", ...numbers}; status is "ok", "FAIL" (MoEyard's
path breaks or waits where it must not) or "info" (a fact about this torch, e.g. a fallback kernel).

  pipeline API   PipelineStage's signature and schedule.step's, against parallel/compat.py's detection
  pipeline run   pp2 in bf16 on two CPU ranks (gloo) against one process: the trainer's pipelined path
                 under this torch (its stage checks of declared dtypes and shapes included)
  grouped_mm     the experts (moe/experts.py) as one grouped matmul against one matmul per expert, on groups
                 with empty and odd sizes: outputs and gradients, and host synchronisations of each on CUDA
  H2D copy       how long the host is held by a batch copy queued behind a 50 ms kernel: the trainer's
                 (pinned, non_blocking) against pageable copies
  attention      per shape (GQA and MLA, causal and packed documents), the kernel the model picks (FlexAttention
                 or SDPA limited to its fused kernels, `moe.attention.attention_kernel`) with its module's time
                 and peak memory (forward+backward under bf16 autocast), the backend SDPA alone would pick, and
                 each SDPA backend's and compiled FlexAttention's feasibility and peak memory
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moeyard.moe.attention import attend, attention_mask, build_attention, model_kernel
from moeyard.moe.config import ModelConfig
from moeyard.moe.experts import GroupedExperts, grouped_mm_unfused_reason
from moeyard.moe.masking import block_causal_mask, document_positions, flex_block_mask
from moeyard.moe.presets import PRESETS


def record(check: str, case: str, status: str, detail: str, **numbers: Any) -> dict[str, Any]:
    return {"check": check, "case": case, "status": status, "detail": detail, **numbers}


def first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:160]}"


def host_syncs(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Host synchronisations one call of `fn` makes (CUDA only: the sync debug mode warns on each)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# ------------------------------------------------------------------------------------------------ pipeline


def pipeline_api() -> dict[str, Any]:
    """Whether PipelineStage takes input_grads/output_grads and schedule.step takes return_outputs, and
    whether parallel/compat.py (where present) detects the same."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    stage = inspect.signature(PipelineStage.__init__).parameters
    takes_grads = "input_grads" in stage and "output_grads" in stage
    return_outputs = "return_outputs" in inspect.signature(PipelineScheduleSingle.step).parameters
    try:
        from moeyard.parallel.compat import stage_takes_grads
    except ImportError:
        compat = None
    else:
        compat = stage_takes_grads()
    detail = f"PipelineStage input_grads/output_grads: {'yes' if takes_grads else 'no'}; step(return_outputs): "
    detail += f"{'yes' if return_outputs else 'no'}; compat.stage_takes_grads(): {compat}"
    ok = compat in (None, takes_grads) and return_outputs
    return record("pipeline", "torch API", "ok" if ok else "FAIL", detail, takes_grads=takes_grads, compat=compat)


def _pipeline_rank(rank: int, cfg: Any, out: str) -> None:
    from moeyard.train.trainer import train

    with contextlib.redirect_stdout(io.StringIO()):  # the ranks' metric lines would land inside the table
        history = train(cfg, timeout_s=120)
    if rank == 0:
        Path(out).write_text(json.dumps([m.get("loss") for m in history]))


def pipeline_run(steps: int) -> dict[str, Any]:
    """pp2 of the debug model in bf16 on two CPU ranks, and the same job on one process: the losses."""
    from gpu_checks.runs import ModelCase, Variant, job_config
    from moeyard.launch.validate import validate
    from moeyard.train.spawn import spawn_ranks
    from moeyard.train.trainer import train

    debug = PRESETS["debug"]
    case = ModelCase(model=debug.model_config(), moe=debug.moe_config(), batch=4, seq_len=32)
    with tempfile.TemporaryDirectory(prefix="gpu_check-pp-") as tmp:
        cfg = job_config(case, Variant(compile=False), torch.device("cpu"), steps, Path(tmp) / "single")
        cfg.train = replace(cfg.train, micro_batches=2, log_every=1)
        with contextlib.redirect_stdout(io.StringIO()):
            single = [m.get("loss") for m in train(cfg)]
        cfg.run = replace(cfg.run, dir=str(Path(tmp) / "pp2"))
        cfg.parallel = replace(cfg.parallel, pp=2)
        validate(cfg, 2)
        out = Path(tmp) / "pp2_losses.json"
        spawn_ranks(_pipeline_rank, (cfg, str(out)), world=2, timeout_s=300, what="gpu_check pp2")
        pp2 = json.loads(out.read_text())
    diff = max(abs(a - b) for a, b in zip(pp2, single, strict=True))
    # Pipelining changes no op of the step, so the losses agree to bf16 reordering at most; a lost micro-batch
    # gradient or a stage fed the wrong input moves the loss by tenths within these steps.
    ok = all(math.isfinite(v) for v in pp2) and diff <= 1e-2
    detail = f"losses {', '.join(f'{v:.4f}' for v in pp2)}; against one process max |diff| {diff:.2g} (tol 0.01)"
    return record("pipeline", "pp2 bf16, 2 CPU ranks", "ok" if ok else "FAIL", detail, losses=pp2, single=single)


# ---------------------------------------------------------------------------------------------- grouped_mm


def group_counts(experts: int, scale: int) -> list[int]:
    """Rows per expert: empty groups (the first and the last among them) between groups of odd sizes."""
    pattern = [0, 3, 0, 17, 1, 0, 9, 0]
    return [n * scale + 1 if n else 0 for n in (pattern[e % len(pattern)] for e in range(experts))]


def grouped_mm_check(device: torch.device, dtype: torch.dtype, dim: int, hidden: int, scale: int) -> dict[str, Any]:
    """GroupedExperts as one grouped matmul and as one matmul per expert: the same weights and rows."""
    experts = 8
    counts = group_counts(experts, scale)
    gen = torch.Generator(device=device).manual_seed(0)
    fused = GroupedExperts(experts, dim, hidden, grouped_mm="on").to(device)
    with torch.no_grad():
        for w in fused.parameters():
            w.copy_(torch.randn(w.shape, generator=gen, device=device) * w.shape[1] ** -0.5)
    looped = GroupedExperts(experts, dim, hidden, grouped_mm="off").to(device)
    looped.load_state_dict(fused.state_dict())
    x = torch.randn(sum(counts), dim, generator=gen, device=device)
    grad = torch.randn(sum(counts), dim, generator=gen, device=device, dtype=dtype)
    counts_E = torch.tensor(counts, device=device)
    results = {}
    for name, module in (("grouped_mm", fused), ("loop", looped)):
        xi = x.clone().requires_grad_(True)

        def step(module: GroupedExperts = module, xi: torch.Tensor = xi) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = module(xi, counts_E)
            out.backward(grad.to(out.dtype))
            return out

        step()  # warm-up (first-call kernels and autotuning), then the counted call
        module.zero_grad(set_to_none=True)
        xi.grad = None
        syncs = host_syncs(step, device)
        module.zero_grad(set_to_none=True)
        xi.grad = None
        out = step()
        results[name] = (out.detach().float(), xi.grad.float(), module.w1.grad.float(), syncs)
    # A group misplaced by one row (an empty or odd group mishandled) changes outputs by their own size; bf16
    # rounding of the two paths' intermediates differs by a few units of 2^-8 of the largest value.
    tol = 4 * 2.0**-8 if dtype == torch.bfloat16 else 1e-5
    errors = [
        (a - b).abs().max().item() / b.abs().max().item()
        for a, b in zip(results["grouped_mm"][:3], results["loop"][:3], strict=True)
    ]
    reason = grouped_mm_unfused_reason(device, dtype)
    syncs = {name: r[3] for name, r in results.items()}
    dtype_name = str(dtype).removeprefix("torch.")
    detail = f"rows per expert {counts}: max rel. error out/dx/dw1 {max(errors):.2g} (tol {tol:.2g}); host syncs "
    detail += (
        f"{syncs['grouped_mm']} vs loop {syncs['loop']}; {'fused kernel' if reason is None else 'fallback: ' + reason}"
    )
    case = f"{dtype_name} E={experts} D={dim} F={hidden}, empty and odd groups"
    status = "ok" if max(errors) <= tol else "FAIL"
    return record("grouped_mm", case, status, detail, errors=errors, host_syncs=syncs, fallback=reason)


# ------------------------------------------------------------------------------------------------ H2D copy


def h2d_check(device: torch.device, rows: int, seq_len: int) -> list[dict[str, Any]]:
    """Host time of a batch copy queued behind a 50 ms kernel: the trainer's `to_device` and pageable copies."""
    from moeyard.train.data import to_device

    if device.type != "cuda":
        return [record("h2d copy", "trainer to_device", "info", "n/a on CPU (the batch stays where it is)")]
    cycles_per_ms = _sleep_rate()
    batch = torch.randint(0, 32000, (rows, seq_len))
    copies = {
        "trainer to_device (pinned, non_blocking)": lambda: to_device(batch, device),
        "pageable, non_blocking": lambda: batch.to(device, non_blocking=True),
        "pageable, blocking": lambda: batch.to(device),
    }
    out = []
    for name, copy in copies.items():
        copy()
        torch.cuda.synchronize()
        torch.cuda._sleep(int(50 * cycles_per_ms))
        start = time.perf_counter()
        copy()
        held_ms = (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()
        waits = held_ms > 25  # the host waited for the queued kernel (half of it at least)
        trainer = name.startswith("trainer")
        status = ("FAIL" if waits else "ok") if trainer else "info"
        detail = f"host held {held_ms:.2f} ms behind a 50 ms kernel ({'waits for it' if waits else 'does not wait'})"
        out.append(record("h2d copy", name, status, detail, held_ms=held_ms))
    return out


def _sleep_rate() -> float:
    """GPU clock cycles per millisecond of torch.cuda._sleep, measured."""
    cycles = 10_000_000
    torch.cuda._sleep(cycles)  # warm-up
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    torch.cuda.synchronize()
    return cycles / start.elapsed_time(end)


# ----------------------------------------------------------------------------------------------- attention


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: the model whose attention it is, `rows` sequences of `seq_len`, packed or not."""

    label: str
    model: ModelConfig
    rows: int
    seq_len: int
    document_mask: bool = False


def attention_shapes(size: str) -> list[AttentionShape]:
    """Mixtral-8x7B's GQA and DeepSeek-V3's MLA as trained here, each causal and with packed documents."""
    mixtral, deepseek = PRESETS["mixtral_8x7b"].model_config(), PRESETS["deepseek_v3"].model_config()
    if size != "full":
        small = dict(dim=64, n_heads=4, n_kv_heads=2, max_seq_len=128)
        mixtral, seq = replace(mixtral, **small), 128
        deepseek = replace(deepseek, **small, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8)
        deepseek = replace(deepseek, qk_nope_head_dim=16, v_head_dim=16)
    else:
        seq = 4096
    return [
        AttentionShape("Mixtral GQA causal", mixtral, 2, seq),
        AttentionShape("Mixtral GQA documents", mixtral, 2, seq, document_mask=True),
        AttentionShape("DeepSeek-V3 MLA causal", deepseek, 1, seq),
        AttentionShape("DeepSeek-V3 MLA documents", deepseek, 1, seq, document_mask=True),
    ]


def _qkv(shape: AttentionShape, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, H, S, Hd] as the model hands them to SDPA (kv heads fewer under GQA)."""
    m = shape.model
    mla = m.attention == "mla"
    qk, vd = (m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim) if mla else (m.head_dim, m.head_dim)
    kv_heads = m.n_heads if mla else m.n_kv_heads
    make = lambda heads, width: torch.randn(shape.rows, heads, shape.seq_len, width, device=device, dtype=dtype)
    return make(m.n_heads, qk), make(kv_heads, qk), make(kv_heads, vd)


def _doc_ids(shape: AttentionShape, device: torch.device) -> torch.Tensor | None:
    """Packed documents of a few hundred tokens (at 4096), or None for one causal sequence per row."""
    if not shape.document_mask:
        return None
    gen = torch.Generator().manual_seed(0)
    starts = torch.rand(shape.rows, shape.seq_len, generator=gen) < 8 / shape.seq_len
    return starts.cumsum(1).to(device)


def _peak(fn: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """(ms, peak GB above what was allocated before) of one call of `fn`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    fn()
    if device.type != "cuda":
        return (time.perf_counter() - start) * 1e3, None
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3, (torch.cuda.max_memory_allocated(device) - base) / 1e9


def _declined(err: BaseException, caught: list[warnings.WarningMessage]) -> str:
    """Why a backend declined: the last reason torch warned (SDPA says why each kernel declines), else the error."""
    reasons = [str(w.message).split(" (Triggered")[0] for w in caught]
    reasons = [r for r in reasons if not r.rstrip().endswith("because:")] or [str(err)]
    return "no: " + reasons[-1].strip().splitlines()[0].split(". ")[0][:90]


def sdpa_backends(shape: AttentionShape, device: torch.device, dtype: torch.dtype) -> tuple[str, dict[str, str]]:
    """The backend SDPA picks for this call, and each backend's outcome: peak GB of fwd+bwd, or why not."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.requires_grad_(True) for t in _qkv(shape, device, dtype))
    doc = _doc_ids(shape, device)
    mask = block_causal_mask(doc) if doc is not None else None
    kwargs = dict(attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1])
    choose = getattr(torch, "_fused_sdp_choice", None)
    picked = SDPBackend(choose(q, k, v, **kwargs)).name if choose else "unknown"
    outcomes = {}
    for backend in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):

        def run(backend: str = backend) -> None:
            with sdpa_kernel([getattr(SDPBackend, backend)]):
                out = F.scaled_dot_product_attention(q, k, v, **kwargs)
                out.backward(torch.ones_like(out))  # a dense gradient: some kernels reject an expanded one

        with warnings.catch_warnings(record=True) as caught:  # torch says why a backend declines, as warnings
            warnings.simplefilter("always")
            try:
                ms, gb = _peak(run, device)
                outcomes[backend] = f"{gb:.2f} GB" if gb is not None else f"{ms:.0f} ms"
            except RuntimeError as err:
                outcomes[backend] = _declined(err, caught)
        q.grad = k.grad = v.grad = None
    outcomes["FLEX"] = flex_backend(shape, device, dtype)
    return picked, outcomes


def flex_backend(shape: AttentionShape, device: torch.device, dtype: torch.dtype) -> str:
    """FlexAttention as `moe.attention.attend` runs it, with the shape's BlockMask (built once, as per
    micro-batch): peak GB of fwd+bwd, compiled, on CUDA (after one call that compiles); elsewhere, where torch
    has no FlexAttention backward, the eager forward's time."""
    q, k, v = (t.transpose(1, 2) for t in _qkv(shape, device, dtype))  # attend takes [B, S, H, Hd]
    block = flex_block_mask(_doc_ids(shape, device), shape.seq_len, device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if device.type != "cuda":
                with torch.no_grad():
                    ms, _ = _peak(lambda: attend(q, k, v, block), device)
                return f"{ms:.0f} ms forward (no backward off CUDA)"
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def run() -> None:
                out = attend(*leaves, block)
                out.backward(torch.ones_like(out))

            run()  # compiles
            return f"{_peak(run, device)[1]:.2f} GB"
        except Exception as err:  # a compile error is not always a RuntimeError
            return _declined(err, caught)


def attention_check(shape: AttentionShape, device: torch.device) -> dict[str, Any]:
    """The model's attention module at `shape`, fwd+bwd under bf16 autocast, with the kernel and mask the model
    picks (model.attn_impl=auto: `moe.attention.attention_mask`), and SDPA's and FlexAttention's outcomes there.
    Status FAIL where the model's path raises (SDPA limited to its fused kernels refuses), info where it runs
    SDPA's math kernel (off CUDA, where nothing limits SDPA)."""
    dtype = torch.bfloat16
    picked, outcomes = sdpa_backends(shape, device, dtype)
    with torch.device(device):
        module = build_attention(shape.model)
    rope = _rope(shape.model, device)
    doc = _doc_ids(shape, device)
    if doc is not None:
        rope = rope[document_positions(doc)]
    x = torch.randn(shape.rows, shape.seq_len, shape.model.dim, device=device, requires_grad=True)
    kernel = model_kernel(shape.model, device.type, dtype, doc is not None)
    with torch.autocast(device.type, dtype=dtype):
        mask = attention_mask(shape.model, doc, x)  # once per micro-batch in the model, outside the timing

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            out = module(x, rope, mask=mask)
        out.float().sum().backward()

    step()  # warm-up (and compile, for FlexAttention on CUDA)
    ms, gb = _peak(step, device)
    backends = ", ".join(f"{name.split('_')[0].lower()} {what}" for name, what in outcomes.items())
    mem = f", peak {gb:.2f} GB" if gb is not None else ""
    detail = f"model: {kernel} {ms:.1f} ms{mem}; SDPA alone picks {picked}; backends: {backends}"
    case = f"{shape.label} {shape.rows}x{shape.seq_len}"
    math_kernel = kernel == "sdpa" and picked in ("MATH", "unknown")
    status = "info" if math_kernel and device.type != "cuda" else "ok"
    return record("attention", case, status, detail, kernel=kernel, picked=picked, backends=outcomes, ms=ms, peak_gb=gb)


def _rope(model: ModelConfig, device: torch.device) -> torch.Tensor:
    from moeyard.moe.attention import rope_table

    return rope_table(model.rope_dim, model.max_seq_len, model.rope_theta, model).to(device)
