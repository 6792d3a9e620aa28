"""Routed experts as stacked SwiGLU weights, run as one grouped matmul over expert-sorted tokens.

Shape legend: N tokens (sorted by expert), D model dim, F expert hidden, E experts held by this module.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from moeyard.moe import scratch
from moeyard.moe.config import MoEConfig

HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")
FUSED_GROUPED_MM_ARCHS = (9, 10)
"""CUDA compute-capability majors (sm90, sm100) where torch's grouped_mm is one fused CUTLASS kernel, for
bf16 only (aten/src/ATen/native/cuda/GroupedBlas.cpp, torch 2.11 and later). Elsewhere torch's fallback reads
the offsets back to the host and runs one matmul per expert: a wait for the device in each of the layer's
three forward and six backward grouped matmuls."""


def _grouped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    if x_ND.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _eager_grouped_mm(fn, x_ND, w_EDF, offsets_E)
    return fn(x_ND, w_EDF, offs=offsets_E)


@torch.compiler.disable
def _eager_grouped_mm(fn, x_ND: torch.Tensor, w_EDF: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """grouped_mm outside the compiled graph: torch.compile traces it with a meta kernel that accepts only
    bf16, while the eager kernel also takes fp32 (CPU runs); a graph break keeps compiled fp32 runs working
    and computing exactly what eager ones do."""
    return fn(x_ND, w_EDF, offs=offsets_E)


class SwiGLUGroupedMM(torch.autograd.Function):
    """silu(x W1) * (x W3) W2 per expert as grouped matmuls, with a backward written out by hand.

    Autograd's own graph of the same ops keeps silu(gate) and the gated product alive, and computes the
    input gradient as two [N, D] grouped matmuls plus an add. This one keeps x, gate and up, recomputes
    silu(gate) in backward, writes the gate and up gradients side by side into one [N, 2F] buffer, takes
    the input gradient as ONE grouped matmul against [W1 | W3] where copying those is the cheaper extra,
    and reuses its [N, F] temporaries in place. On CPU, where each new large tensor costs page faults, that
    took the experts' forward+backward below three plain grouped_mm calls at the fine-grained shape of
    benchmarks/moe_layer.py (0.92x, 1 thread). The temporaries that die inside forward or backward (the
    hidden h, silu(gate), the [N, 2F] gradient, the [W1 | W3] copy) live in moe/scratch.py's kept buffer,
    so they cost no fresh pages either. The same products: equal to autograd's result within fp32 rounding
    (only the input gradient's sum over 2F may run in another order).
    """

    @staticmethod
    def forward(ctx, x_ND, w1_EDF, w3_EDF, w2_EFD, offsets_E):
        gate_NF, up_NF = _grouped_mm(x_ND, w1_EDF, offsets_E), _grouped_mm(x_ND, w3_EDF, offsets_E)
        ctx.save_for_backward(x_ND, w1_EDF, w3_EDF, w2_EFD, gate_NF, up_NF, offsets_E)
        (h_NF,) = scratch.take(gate_NF.dtype, gate_NF.shape)
        return _grouped_mm(torch.ops.aten.silu.out(gate_NF, out=h_NF).mul_(up_NF), w2_EFD, offsets_E)

    @staticmethod
    def backward(ctx, dy_ND):
        x_ND, w1_EDF, w3_EDF, w2_EFD, gate_NF, up_NF, offsets_E = ctx.saved_tensors
        need_x, need_w1, need_w3, need_w2, _ = ctx.needs_input_grad
        dy_ND = dy_ND.contiguous()
        (N, hidden), (E, D, _) = gate_NF.shape, w1_EDF.shape
        dh_NF = _grouped_mm(dy_ND, w2_EFD.transpose(1, 2), offsets_E)
        w13_shape = (E, D, 2 * hidden) if _input_grad_concatenates(E, hidden, N) else (0,)
        silu_NF, dgu_N2F, w13_ED2F = scratch.take(gate_NF.dtype, (N, hidden), (N, 2 * hidden), w13_shape)
        torch.ops.aten.silu.out(gate_NF, out=silu_NF)
        dgate_NF, dup_NF = dgu_N2F[:, :hidden], dgu_N2F[:, hidden:]
        torch.mul(dh_NF, silu_NF, out=dup_NF)
        torch.ops.aten.silu_backward.grad_input(dh_NF.mul_(up_NF), gate_NF, grad_input=dgate_NF)
        dw2 = _grouped_mm(silu_NF.mul_(up_NF).T, dy_ND, offsets_E) if need_w2 else None
        dw1 = _grouped_mm(x_ND.T, dgate_NF, offsets_E) if need_w1 else None
        dw3 = _grouped_mm(x_ND.T, dup_NF, offsets_E) if need_w3 else None
        dx = _input_grad(dgu_N2F, w1_EDF, w3_EDF, w13_ED2F, offsets_E) if need_x else None
        return dx, dw1, dw3, dw2, None


def _input_grad_concatenates(experts: int, hidden: int, rows: int) -> bool:
    """Whether the input gradient is one grouped matmul over [W1 | W3] copied side by side: when copying
    them (E*D*2F elements) costs less than a second [N, D] product and its add, i.e. unless experts are few
    and wide against the rows (E*F > N)."""
    return experts * hidden <= rows


def _input_grad(dgu_N2F, w1_EDF, w3_EDF, w13_ED2F, offsets_E: torch.Tensor) -> torch.Tensor:
    """dgate W1^T + dup W3^T [N, D]; `w13_ED2F` is the buffer for [W1 | W3] where that is the cheaper way."""
    (E, _, hidden), N = w1_EDF.shape, dgu_N2F.shape[0]
    if not _input_grad_concatenates(E, hidden, N):
        dx_ND = _grouped_mm(dgu_N2F[:, :hidden], w1_EDF.transpose(1, 2), offsets_E)
        return dx_ND.add_(_grouped_mm(dgu_N2F[:, hidden:], w3_EDF.transpose(1, 2), offsets_E))
    return _grouped_mm(dgu_N2F, torch.cat([w1_EDF, w3_EDF], 2, out=w13_ED2F).transpose(1, 2), offsets_E)


def aligned_for_grouped_mm(dim: int, hidden: int) -> bool:
    """grouped_mm needs 16-byte aligned row strides: widths that are multiples of 8 serve fp32 and bf16."""
    return dim % 8 == 0 and hidden % 8 == 0


def uses_grouped_mm(setting: str, dim: int, hidden: int) -> bool:
    """Whether experts of these widths multiply by grouped_mm under `moe.grouped_mm=setting` (before
    `choose_expert_path` turns it off on a device without the fused kernel)."""
    return setting == "on" or (setting == "auto" and HAS_GROUPED_MM and aligned_for_grouped_mm(dim, hidden))


def hand_backward_on_cpu(e: MoEConfig, dim: int) -> bool:
    """Whether CPU eager runs `SwiGLUGroupedMM` for the experts of `e` (the planner's activation model asks)."""
    plain = not e.expert_biases and e.activation != "clamped_swiglu"
    return plain and uses_grouped_mm(e.grouped_mm, dim, e.expert_hidden)


def looped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor | list[int]) -> torch.Tensor:
    """Reference: one matmul per expert over its slice of the sorted tokens (counts read on the host)."""
    chunks = torch.split(x_ND, counts_E if isinstance(counts_E, list) else counts_E.tolist())
    # unbind, not w_EDF[e]: each indexing op's backward writes a full [E, D, F] gradient (cost grows with E^2).
    return torch.cat([chunk @ w_DF for chunk, w_DF in zip(chunks, w_EDF.unbind(0), strict=True)])


def clamped_swiglu(gate_NF: torch.Tensor, up_NF: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss's gate: (clamp(up, +-limit) + 1) * g sigmoid(alpha g), g = min(gate, limit). The clamps bound
    the activations (OpenAI trained with them); the +1 lets a zero up pass the gate through."""
    gate_NF = gate_NF.clamp(max=limit)
    return (up_NF.clamp(-limit, limit) + 1) * gate_NF * torch.sigmoid(alpha * gate_NF)


class GroupedExperts(nn.Module):
    """E SwiGLU experts: y = (silu(x W1) * (x W3)) W2, per expert.

    Options (moe config, see `from_config`): biases b1, b3 [E, F] and b2 [E, D] added after each projection
    (expert_biases; sharded over ep with the weights, on dim 0), and gpt-oss's `clamped_swiglu` gate."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        grouped_mm: Literal["auto", "on", "off"] = "auto",
        biases: bool = False,
        clamp: tuple[float, float] | None = None,
    ):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden)) if biases else None
        self.b3 = nn.Parameter(torch.empty(num_experts, hidden)) if biases else None
        self.b2 = nn.Parameter(torch.empty(num_experts, dim)) if biases else None
        self.clamp = clamp
        """(alpha, limit) of `clamped_swiglu`, or None for silu(gate) * up."""
        if grouped_mm == "on" and not HAS_GROUPED_MM:
            raise ValueError("moe.grouped_mm=on needs torch grouped_mm, which this torch lacks (rule: use auto or off)")
        if grouped_mm == "on" and not aligned_for_grouped_mm(dim, hidden):
            raise ValueError(f"moe.grouped_mm=on needs dim and expert_hidden divisible by 8 (got {dim}, {hidden})")
        self.use_grouped_mm = uses_grouped_mm(grouped_mm, dim, hidden)

    @classmethod
    def from_config(cls, cfg: MoEConfig, num_experts: int, dim: int) -> GroupedExperts:
        """`num_experts` experts of the moe config `cfg` (all of them, or one ep rank's share)."""
        clamp = (cfg.swiglu_alpha, cfg.swiglu_limit) if cfg.activation == "clamped_swiglu" else None
        return cls(num_experts, dim, cfg.expert_hidden, cfg.grouped_mm, cfg.expert_biases, clamp)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Args: x_ND tokens sorted by expert; counts_E tokens per expert (int). Returns y_ND."""
        if x_ND.shape[0] == 0:
            # A rank can receive no tokens; keep the weights in the graph so their (zero) grads exist.
            return x_ND + 0 * sum(p.sum() for p in self.parameters())
        w1, w2, w3 = self.w1, self.w2, self.w3
        dtype = autocast_dtype(x_ND.device.type)
        if dtype is not None:
            # Autocast does not cover grouped_mm: without this the experts would run in fp32 under bf16
            # training whenever the weights are fp32 masters (replicate mode). The casts are differentiable,
            # so gradients still reach the fp32 weights in fp32.
            x_ND, w1, w2, w3 = (t.to(dtype) for t in (x_ND, w1, w2, w3))
        bias = self._bias_rows(counts_E, x_ND.shape[0], x_ND.dtype)
        if self.use_grouped_mm:
            # grouped_mm wants int32 cumulative row ends and contiguous operands (its CPU backward
            # rejects stride-0 gradients).
            offsets_E = counts_E.cumsum(0).to(torch.int32)
            mm = lambda a, w: _grouped_mm(a.contiguous(), w, offsets_E)
        else:
            # The layer's one host read, shared by its three matmuls. Under torch.compile it is traced as
            # symbolic sizes (parallel's apply_compile turns on dynamo's capture_scalar_outputs), not a break.
            counts = counts_E.tolist()
            mm = lambda a, w: looped_mm(a, w, counts)
        if self._hand_backward(x_ND):
            return SwiGLUGroupedMM.apply(x_ND.contiguous(), w1, w3, w2, offsets_E)
        gate_NF, up_NF = bias(mm(x_ND, w1), self.b1), bias(mm(x_ND, w3), self.b3)
        if self.clamp is None:
            h_NF = F.silu(gate_NF) * up_NF
        else:
            h_NF = clamped_swiglu(gate_NF, up_NF, *self.clamp)
        return bias(mm(h_NF, w2), self.b2)

    def _hand_backward(self, x_ND: torch.Tensor) -> bool:
        """Whether `SwiGLUGroupedMM` runs: grouped_mm in eager mode on CPU (where it was measured; compiled
        graphs fuse the elementwise work themselves), plain silu gate, no biases."""
        plain = self.b1 is None and self.clamp is None
        return self.use_grouped_mm and plain and x_ND.device.type == "cpu" and not torch.compiler.is_compiling()

    def _bias_rows(self, counts_E: torch.Tensor, rows: int, dtype: torch.dtype):
        """A function adding each row's expert bias ([E, W] repeated by counts) to an [N, W] output, or
        returning the output as it is without biases. output_size keeps repeat_interleave off the host."""
        if self.b1 is None:
            return lambda y, b: y
        return lambda y, b: y + b.to(dtype).repeat_interleave(counts_E, dim=0, output_size=rows)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on `device_type`, or None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def grouped_mm_unfused_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch's grouped_mm would take its host-reading fallback on `device` for `dtype`, or None when it
    runs without one (the fused kernel on CUDA; on CPU the offsets are host memory already)."""
    if device.type != "cuda":
        return None
    if torch.version.hip is not None:
        return "ROCm has no fused grouped_mm kernel"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in FUSED_GROUPED_MM_ARCHS:
        return f"torch has no fused grouped_mm kernel for sm{major}{minor} (only sm90/sm100)"
    if dtype != torch.bfloat16:
        return f"torch's fused grouped_mm kernel takes bf16, not {str(dtype).removeprefix('torch.')} (train.dtype)"
    return None


def choose_expert_path(experts: list[GroupedExperts], setting: str, device: torch.device, dtype: torch.dtype) -> str:
    """Settles how `experts` multiply on `device` in compute `dtype`, once, at start-up; returns the line that
    says which path runs and why ("" when it is the expected one). moe.grouped_mm=on where the fused kernel
    is missing is refused (ValueError): its fallback waits for the device in every matmul."""
    reason = grouped_mm_unfused_reason(device, dtype)
    if reason is None or not any(e.use_grouped_mm for e in experts):
        return ""
    if setting == "on":
        raise ValueError(f"moe.grouped_mm=on cannot run fused here: {reason} (rule: use auto or off)")
    for e in experts:
        e.use_grouped_mm = False
    return (
        f"moe: experts run one matmul per expert, reading the counts once per layer ({reason}; its fallback "
        "would read them back in each of the layer's nine grouped matmuls)"
    )
