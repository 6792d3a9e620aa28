"""The hand-written CPU backward passes of the experts (`SwiGLUGroupedMM`) and of the combine
(`weighted_scatter_add`, and the sparse product `combine_every_assignment` runs for dropless token choice)
give what autograd's graph of the same ops gives: the same outputs and gradients within fp32 rounding
(torch.testing's fp32 defaults: each element is one sum of the same products, only summed in another
order), for experts with no rows, frozen weights, and both ways of taking the input gradient (one matmul
over [W1 | W3], or two). The experts' temporaries come from moe/scratch.py's kept buffer: two layers whose
forwards and backwards interleave, and an activation-checkpoint recompute inside backward, still match,
and no returned tensor lies in that buffer.

Run: .venv/bin/pytest -q tests/unit/test_expert_backward.py
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moeyard.moe import scratch
from moeyard.moe.combine import combine_every_assignment, weighted_scatter_add
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


def test_combine_every_assignment_matches_autograd() -> None:
    torch.manual_seed(0)
    T, K, D = 9, 3, 16
    order_N = torch.randperm(T * K)  # rows arrive in any order, e.g. sorted by expert
    y_ND = torch.randn(T * K, D, requires_grad=True)
    weight_A = torch.rand(T * K, requires_grad=True)
    grad_TD = torch.randn(T, D)

    def plain() -> torch.Tensor:
        return y_ND.new_zeros(T, D).index_add(0, order_N // K, y_ND * weight_A[order_N][:, None])

    assert type(combine_every_assignment(y_ND, weight_A, order_N, K).grad_fn).__name__ == "_SparseCombineBackward"
    # MKL's sparse product takes fp32 and fp64 only: bf16 rows with bf16 weights keep the index_add; with
    # the router's fp32 weights they take the product, in fp32 (tests/unit/test_combine_precision.py).
    bf16 = combine_every_assignment(y_ND.bfloat16(), weight_A.bfloat16(), order_N, K)
    assert type(bf16.grad_fn).__name__ == "_WeightedScatterAddBackward"
    mixed = combine_every_assignment(y_ND.bfloat16(), weight_A, order_N, K)
    assert type(mixed.grad_fn).__name__ == "_SparseCombineBackward" and mixed.dtype == torch.bfloat16
    ours = _grads(lambda: combine_every_assignment(y_ND, weight_A, order_N, K), [y_ND, weight_A], grad_TD)
    for got, want in zip(ours, _grads(plain, [y_ND, weight_A], grad_TD), strict=True):
        torch.testing.assert_close(got, want)


def _experts(seed: int) -> GroupedExperts:
    torch.manual_seed(seed)
    module = GroupedExperts(4, 16, 8, grouped_mm="on")
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return module


def _arena_spans() -> list[tuple[int, int]]:
    buffers = getattr(scratch._arenas, "by_dtype", {}).values()
    return [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in buffers]


def test_interleaved_layers_and_recompute_share_the_scratch_buffer() -> None:
    counts_E = torch.tensor([20, 0, 30, 14])
    layers = [_experts(1), _experts(2)]
    x_ND = torch.randn(64, 16, requires_grad=True)
    grad_ND = torch.randn(64, 16)

    def stacked(recompute: bool):
        h_ND = x_ND
        for layer in layers:  # both forwards take the buffer before either backward does
            h_ND = checkpoint(layer, h_ND, counts_E, use_reentrant=False) if recompute else layer(h_ND, counts_E)
        return h_ND

    def reference():
        h_ND = x_ND
        for layer in layers:
            h_ND = _autograd_swiglu(layer, h_ND, counts_E)
        return h_ND

    inputs = [x_ND, *(p for layer in layers for p in layer.parameters())]
    want = _grads(reference, inputs, grad_ND)
    for recompute in (False, True):
        got = _grads(lambda recompute=recompute: stacked(recompute), inputs, grad_ND)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    held = scratch.held_bytes()
    assert held > 0
    got = _grads(lambda: stacked(False), inputs, grad_ND)
    assert scratch.held_bytes() == held  # kept and reused, not grown, on a repeat
    for t in got:
        start = t.data_ptr()
        assert not any(lo <= start < hi for lo, hi in _arena_spans()), "a result lies in the scratch buffer"
