"""Routed experts as stacked SwiGLU weights, run as one grouped matmul over expert-sorted tokens.

Shape legend: N tokens (sorted by expert), D model dim, F expert hidden, E experts held by this module.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HAS_GROUPED_MM = hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


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


def looped_mm(x_ND: torch.Tensor, w_EDF: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert over its slice of the sorted tokens."""
    chunks = torch.split(x_ND, counts_E.tolist())
    # unbind, not w_EDF[e]: each indexing op's backward writes a full [E, D, F] gradient (cost grows with E^2).
    return torch.cat([chunk @ w_DF for chunk, w_DF in zip(chunks, w_EDF.unbind(0), strict=True)])


class GroupedExperts(nn.Module):
    """E SwiGLU experts: y = (silu(x W1) * (x W3)) W2, per expert."""

    def __init__(self, num_experts: int, dim: int, hidden: int, grouped_mm: Literal["auto", "on", "off"] = "auto"):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        if grouped_mm == "on" and not HAS_GROUPED_MM:
            raise ValueError("moe.grouped_mm=on needs torch grouped_mm, which this torch lacks (rule: use auto or off)")
        # grouped_mm needs 16-byte aligned row strides: widths that are multiples of 8 serve fp32 and bf16.
        aligned = dim % 8 == 0 and hidden % 8 == 0
        if grouped_mm == "on" and not aligned:
            raise ValueError(f"moe.grouped_mm=on needs dim and expert_hidden divisible by 8 (got {dim}, {hidden})")
        self.use_grouped_mm = grouped_mm == "on" or (grouped_mm == "auto" and HAS_GROUPED_MM and aligned)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Args: x_ND tokens sorted by expert; counts_E tokens per expert (int). Returns y_ND."""
        if x_ND.shape[0] == 0:
            # A rank can receive no tokens; keep the weights in the graph so their (zero) grads exist.
            return x_ND + 0 * (self.w1.sum() + self.w2.sum() + self.w3.sum())
        w1, w2, w3 = self.w1, self.w2, self.w3
        dtype = _autocast_dtype(x_ND.device.type)
        if dtype is not None:
            # Autocast does not cover grouped_mm: without this the experts would run in fp32 under bf16
            # training whenever the weights are fp32 masters (replicate mode). The casts are differentiable,
            # so gradients still reach the fp32 weights in fp32.
            x_ND, w1, w2, w3 = (t.to(dtype) for t in (x_ND, w1, w2, w3))
        if self.use_grouped_mm:
            # grouped_mm wants int32 cumulative row ends and contiguous operands (its CPU backward
            # rejects stride-0 gradients).
            offsets_E = counts_E.cumsum(0).to(torch.int32)
            mm = lambda a, w: _grouped_mm(a.contiguous(), w, offsets_E)
        else:
            mm = lambda a, w: looped_mm(a, w, counts_E)
        h_NF = F.silu(mm(x_ND, w1)) * mm(x_ND, w3)
        return mm(h_NF, w2)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on `device_type`, or None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)
