"""bf16 expert outputs are combined in fp32: each token's K rows, weighted by the router's fp32 weights, are
summed in fp32 and rounded to bf16 once, on every path of moe/combine.py (the CPU sparse product, the CPU
hand-written index_add, the plain ops compiled graphs, accelerators and the static dispatcher run).

The bound is derived, not tuned: with u = 2^-8 (bf16's unit roundoff, 8 significant bits), every output
element is within u |exact| of the exact weighted sum, plus the fp32 products' and sum's own error, at most K
2^-24 times the sum of the terms' magnitudes before the final rounding ((K + 1) 2^-24 after it). Summing in
bf16 (bf16 weights, products and partial sums, the old way) errs by up to (K + 1) u times that sum of
magnitudes, which cancellation among a token's rows makes far larger than u |exact|: the test shows it breaks
the bound on the same data, so the bound tells the two apart. The weights' gradients are fp32 sums of exact
products, within the fp32 sum's error; the rows' gradients are one product per element, rounded at most twice
(the CPU paths round the weight to bf16 first), within (2u + u^2) |exact|. Summing in fp32 keeps no fp32 copy
of the rows for the backward: each path saves the bf16 rows, the fp32 weights and the indices, as
plan/activations.py counts them.

Run: .venv/bin/pytest -q tests/unit/test_combine_precision.py
"""

from __future__ import annotations

import pytest
import torch

from moeyard.moe.combine import combine_every_assignment, plain_weighted_sum, weighted_scatter_add

U_BF16, U_FP32 = 2.0**-8, 2.0**-24
T, K, D = 64, 8, 32


def _case(seed: int = 0):
    """bf16 rows, fp32 router weights, rows in a random (expert-sorted-like) order, an output gradient."""
    gen = torch.Generator().manual_seed(seed)
    order_N = torch.randperm(T * K, generator=gen)
    y_ND = torch.randn(T * K, D, generator=gen).bfloat16()
    weight_A = torch.softmax(torch.randn(T, K, generator=gen), -1).flatten()
    grad_TD = torch.randn(T, D, generator=gen).bfloat16()
    return order_N, y_ND, weight_A, grad_TD


def _exact(order_N, y_ND, weight_A):
    """fp64 weighted sums (exact for these inputs up to fp64 rounding) and the sums of the terms' magnitudes."""
    terms_ND = y_ND.double() * weight_A.double()[order_N][:, None]
    token_N = order_N // K
    exact = torch.zeros(T, D, dtype=torch.float64).index_add_(0, token_N, terms_ND)
    magnitude = torch.zeros(T, D, dtype=torch.float64).index_add_(0, token_N, terms_ND.abs())
    return exact, magnitude


def _excess(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor, terms: int) -> torch.Tensor:
    """How far each element lies outside one bf16 rounding plus an fp32 sum of `terms` terms (<= 0: inside)."""
    bound = U_BF16 * exact.abs() + (terms + 1) * U_FP32 * magnitude
    return (got.double() - exact).abs() - bound


PATHS = {
    "sparse product": lambda order_N, y, w: combine_every_assignment(y, w, order_N, K),
    "hand-written index_add": lambda order_N, y, w: weighted_scatter_add(y, w[order_N], order_N // K, T),
    "plain ops": lambda order_N, y, w: plain_weighted_sum(y, w[order_N], order_N // K, T),
}


@pytest.mark.parametrize("path", PATHS)
def test_bf16_rows_sum_in_fp32(path: str) -> None:
    order_N, y_ND, weight_A, _ = _case()
    exact, magnitude = _exact(order_N, y_ND, weight_A)
    out = PATHS[path](order_N, y_ND, weight_A)
    assert out.dtype == torch.bfloat16
    assert _excess(out, exact, magnitude, K).max() <= 0
    # The old way, everything in bf16, breaks the same bound: it guards the effect.
    in_bf16 = torch.zeros(T, D, dtype=torch.bfloat16).index_add_(
        0, order_N // K, y_ND * weight_A.bfloat16()[order_N][:, None]
    )
    assert _excess(in_bf16, exact, magnitude, K).max() > 0


@pytest.mark.parametrize("path", PATHS)
def test_bf16_gradients(path: str) -> None:
    order_N, y_ND, weight_A, grad_TD = _case(1)
    y = y_ND.clone().requires_grad_(True)
    w = weight_A.clone().requires_grad_(True)
    PATHS[path](order_N, y, w).backward(grad_TD)
    assert y.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    g_ND = grad_TD.double()[order_N // K]
    want_y = g_ND * weight_A.double()[order_N][:, None]
    # At most two roundings: the CPU paths round the weight to bf16, then the product.
    assert ((y.grad.double() - want_y).abs() <= (2 * U_BF16 + U_BF16**2) * want_y.abs()).all()
    dots_N = (g_ND * y_ND.double()).sum(-1)
    magnitude_N = (g_ND * y_ND.double()).abs().sum(-1)
    want_w = torch.empty_like(dots_N).index_copy_(0, order_N, dots_N)
    magnitude_A = torch.empty_like(magnitude_N).index_copy_(0, order_N, magnitude_N)
    # bf16 x bf16 products are exact in fp32: only the fp32 sum of D of them errs, and nothing rounds to bf16.
    assert ((w.grad.double() - want_w).abs() <= (D + 1) * U_FP32 * magnitude_A).all()


def test_sums_in_fp32_under_autocast() -> None:
    """CPU autocast would take the sparse product to bf16 (which MKL's kernel lacks): it still sums in fp32."""
    order_N, y_ND, weight_A, _ = _case(2)
    exact, magnitude = _exact(order_N, y_ND, weight_A)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = combine_every_assignment(y_ND, weight_A, order_N, K)
    assert out.dtype == torch.bfloat16 and _excess(out, exact, magnitude, K).max() <= 0


@pytest.mark.parametrize("path", PATHS)
def test_keeps_no_weighted_copy(path: str) -> None:
    """Each path saves the bf16 rows, one fp32 weight and one int64 index per row, and nothing of [N, D]
    in fp32 (autograd's index_add would keep its weighted source: the planner's `moe_sent` counts without it)."""
    order_N, y_ND, weight_A, _ = _case(3)
    y, w = y_ND.clone().requires_grad_(True), weight_A.clone().requires_grad_(True)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        PATHS[path](order_N, y, w)
    N = T * K
    # The two paths fed gathered weights also keep the gather's index (`w[order_N]`, which the dispatcher's
    # index_select does too: the planner's sort order); the sparse product reads the order itself.
    indices = 1 if path == "sparse product" else 2
    assert sum(storages.values()) == N * (D * 2 + 4 + 8 * indices)
