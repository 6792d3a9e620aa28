"""The hand-written CPU backward passes of the experts (`SwiGLUGroupedMM`) and of the combine
(`weighted_scatter_add`) give what autograd's graph of the same ops gives: the same outputs and gradients
within fp32 rounding (torch.testing's fp32 defaults: each element is one sum of the same products, only
summed in another order), for experts with no rows, frozen weights, and both ways of taking the input
gradient (one matmul over [W1 | W3], or two).

Run: .venv/bin/pytest -q tests/unit/test_expert_backward.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeyard.moe.combine import weighted_scatter_add
from moeyard.moe.experts import HAS_GROUPED_MM, GroupedExperts

pytestmark = pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch without grouped_mm")


def _autograd_swiglu(experts: GroupedExperts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The same three grouped matmuls as plain autograd ops."""
    offsets_E = counts_E.cumsum(0).to(torch.int32)
    mm = getattr(F, "grouped_mm", None) or torch._grouped_mm
    h_NF = F.silu(mm(x_ND, experts.w1, offs=offsets_E)) * mm(x_ND, experts.w3, offs=offsets_E)
    return mm(h_NF, experts.w2, offs=offsets_E)


def _grads(fn, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor | None]:
    out = fn()
    out.backward(grad)
    result = [out.detach(), *(t.grad for t in inputs)]
    for t in inputs:
        t.grad = None
    return result


@pytest.mark.parametrize(
    ("experts", "rows", "frozen"),
    [(4, 64, ()), (8, 12, ()), (4, 64, ("w1", "w2"))],
    ids=["concatenated-input-grad", "two-input-grads", "frozen-weights"],
)
def test_experts_backward_matches_autograd(experts: int, rows: int, frozen: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    module = GroupedExperts(experts, 16, 8, grouped_mm="on")
    for name, p in module.named_parameters():
        torch.nn.init.normal_(p, std=0.3)
        p.requires_grad_(name not in frozen)
    counts_E = torch.zeros(experts, dtype=torch.long)
    counts_E[0], counts_E[2:] = rows // 2, rows // 2 // (experts - 2)  # expert 1 gets no rows
    counts_E[-1] += rows - counts_E.sum()
    x_ND = torch.randn(rows, 16, requires_grad=True)
    grad_ND = torch.randn(rows, 16)
    inputs = [x_ND, *(p for p in module.parameters() if p.requires_grad)]
    assert module._hand_backward(x_ND)
    ours = _grads(lambda: module(x_ND, counts_E), inputs, grad_ND)
    reference = _grads(lambda: _autograd_swiglu(module, x_ND, counts_E), inputs, grad_ND)
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, want)
    assert all(p.grad is None for p in module.parameters() if not p.requires_grad)


def test_combine_matches_autograd() -> None:
    torch.manual_seed(0)
    T, N, D = 10, 37, 16
    y_ND = torch.randn(N, D, requires_grad=True)
    weight_N = torch.rand(N, requires_grad=True)
    token_N = torch.randint(0, T, (N,))
    grad_TD = torch.randn(T, D)

    def plain() -> torch.Tensor:
        return y_ND.new_zeros(T, D).index_add(0, token_N, y_ND * weight_N[:, None])

    ours = _grads(lambda: weighted_scatter_add(y_ND, weight_N, token_N, T), [y_ND, weight_N], grad_TD)
    for got, want in zip(ours, _grads(plain, [y_ND, weight_N], grad_TD), strict=True):
        torch.testing.assert_close(got, want)
