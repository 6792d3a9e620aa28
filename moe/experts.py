"""Routed experts as stacked SwiGLU weights, run as one grouped matmul over expert-sorted tokens.

Shape legend: N tokens (sorted by expert), D model dim, F expert hidden, E experts held by this module.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

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
        # grouped_mm needs 16-byte aligned row strides: widths that are multiples of 8 serve fp32 and bf16.
        aligned = dim % 8 == 0 and hidden % 8 == 0
        if grouped_mm == "on" and not aligned:
            raise ValueError(f"moe.grouped_mm=on needs dim and expert_hidden divisible by 8 (got {dim}, {hidden})")
        self.use_grouped_mm = grouped_mm == "on" or (grouped_mm == "auto" and HAS_GROUPED_MM and aligned)

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
        gate_NF, up_NF = bias(mm(x_ND, w1), self.b1), bias(mm(x_ND, w3), self.b3)
        if self.clamp is None:
            h_NF = F.silu(gate_NF) * up_NF
        else:
            h_NF = clamped_swiglu(gate_NF, up_NF, *self.clamp)
        return bias(mm(h_NF, w2), self.b2)

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
