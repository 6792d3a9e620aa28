"""The combine's weighted scatter-add: out[t] = sum of weight[n] * y[n] over the rows n of token t.

Shape legend: N expert output rows, A assignments, T tokens, D model dim, K assignments per token.

Every path sums in the wider of the rows' and the weights' dtypes and returns the rows' dtype: bf16 expert
outputs with the router's fp32 weights are summed in fp32 and rounded once, where summing in bf16 would
round each weight, each product and each partial sum of a token's K rows (tests/unit/test_combine_precision.py).

Written out by hand on CPU: autograd's backward of `out.index_add(0, token, y * weight[:, None])` makes two
more [N, D] tensors (the gradient times the weight and times y) and reduces one of them; on CPU every new
large tensor costs page faults as well as its pass over memory. This backward weights the rows' gradient
in place and takes the weights' gradient as a batched row-by-row dot product (no [N, D] product). Blocking
the passes into cache-sized pieces was measured too: faster on one thread, but at two threads on a loaded
machine its many small parallel regions lost more than the cache won. Compiled graphs and accelerators keep
plain ops (`plain_weighted_sum`; the compiler fuses them).

Where the rows are every assignment of token-choice routing (dropless, one chunk), the CPU forward is one
sparse-times-dense product instead: a CSR matrix [T, A] holding each token's K weights at its rows' positions,
times y. torch's CPU kernel for it (MKL) writes each output row from one thread, needs no [N, D] weighted
copy and no serial index_add (torch's CPU index_add walks the indices on one thread): at the fine-grained
shape of benchmarks/moe_layer.py 2.0-2.2 ms against 15-21 ms for the weighted copy and index_add (this
CPU, 2 and 1 threads).
It also sums each token's rows in slot order, whatever order the rows arrive in. MKL's kernel takes fp32 and
fp64 only (bf16 rows with fp32 weights go through it in fp32), and a build without MKL may have none:
`sparse_product_runs` asks the build once per dtype, and what it cannot multiply keeps the index_add.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch

CAST_SLICE_BYTES = 8 << 20
"""The CPU paths cast rows narrower than the accumulation dtype (bf16 rows, fp32 sums) a slice of at most
this many bytes at a time: a cast copy of all [N, D] rows would be one more large new tensor per step, which
on CPU costs page faults (moe/scratch.py), where slices this size reuse memory freed a moment before. At
the fine-grained shape of benchmarks/moe_layer.py in bf16 the whole-tensor cast made the combine's forward
4x slower than summing in bf16 (this CPU, 2 threads)."""


def weighted_scatter_add(y_ND: torch.Tensor, weight_N: torch.Tensor, token_N: torch.Tensor, num_tokens: int):
    """[T, D] sums of `weight_N`-weighted rows `y_ND` by token `token_N` (int64), differentiable in y and weight;
    summed in the wider of the two dtypes (`accumulation_dtype`) and returned in y's."""
    if _hand_written(y_ND):
        return _WeightedScatterAdd.apply(y_ND, weight_N, token_N, num_tokens)
    return plain_weighted_sum(y_ND, weight_N, token_N, num_tokens)


def plain_weighted_sum(y_ND: torch.Tensor, weight_N: torch.Tensor, token_N: torch.Tensor, num_tokens: int):
    """The combine as plain ops, for compiled graphs and accelerators (the compiler fuses them).

    scatter_add rather than index_add: autograd's index_add keeps its whole [N, D] source for the backward
    (it reads only its shape), scatter_add keeps the index alone, an expanded view of the [N] tokens."""
    rows_ND = y_ND * weight_N[:, None]  # in the accumulation dtype: fp32 router weights promote bf16 rows
    index_ND = token_N[:, None].expand_as(rows_ND)
    return rows_ND.new_zeros(num_tokens, rows_ND.shape[-1]).scatter_add(0, index_ND, rows_ND).to(y_ND.dtype)


def accumulation_dtype(y_ND: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype a token's rows are summed in: the router's fp32 weights keep bf16 rows' sum in fp32 (one
    rounding to bf16 at the end, as Megatron-Core's unpermute with fp32 probabilities does)."""
    return torch.promote_types(y_ND.dtype, weight.dtype)


def combine_every_assignment(y_ND: torch.Tensor, weight_A: torch.Tensor, order_N: torch.Tensor, per_token: int):
    """[T, D] combine of rows `y_ND` that are all A = T*K assignments of token-major routing (assignment a
    belongs to token a // K), row n being assignment `order_N[n]`; differentiable in y and `weight_A`."""
    if _hand_written(y_ND) and sparse_product_runs(accumulation_dtype(y_ND, weight_A)):
        return _SparseCombine.apply(y_ND, weight_A, order_N, per_token)
    num_tokens = order_N.numel() // per_token
    return weighted_scatter_add(y_ND, weight_A.index_select(0, order_N), order_N // per_token, num_tokens)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The position of each index in the permutation `order`."""
    return inverse_order(torch.arange(order.numel(), device=order.device), order)


def inverse_order(values_N: torch.Tensor, order_N: torch.Tensor) -> torch.Tensor:
    """`values_N` (row n's value) put back in assignment order: out[order_N[n]] = values_N[n]."""
    return torch.empty_like(values_N).index_copy_(0, order_N, values_N)


@cache
def sparse_product_runs(dtype: torch.dtype) -> bool:
    """Whether this torch build multiplies a CPU CSR matrix by a dense one in `dtype` (MKL's kernel on x86
    builds: fp32 and fp64; bf16 and fp16 raise NotImplementedError)."""
    try:
        _csr(torch.tensor([0, 1]), torch.tensor([0]), torch.ones(1, dtype=dtype), 1) @ torch.ones(1, 1, dtype=dtype)
    except RuntimeError:  # NotImplementedError for a dtype the kernel lacks
        return False
    return True


def _csr(row_starts: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, num_columns: int) -> torch.Tensor:
    with warnings.catch_warnings():  # torch warns once per process: CSR tensors are beta, checks are off (2.11)
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_csr_tensor(
            row_starts, columns, values, size=(row_starts.numel() - 1, num_columns), check_invariants=False
        )


def _hand_written(y_ND: torch.Tensor) -> bool:
    return y_ND.device.type == "cpu" and not torch.compiler.is_compiling()


class _WeightedScatterAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, weight_N, token_N, num_tokens):
        ctx.save_for_backward(y_ND, weight_N, token_N)
        acc, (N, D) = accumulation_dtype(y_ND, weight_N), y_ND.shape
        out_TD = y_ND.new_zeros(num_tokens, D, dtype=acc)
        for rows in _slices(N, D * acc.itemsize, y_ND.dtype != acc):  # index_add walks them in row order
            out_TD.index_add_(0, token_N[rows], y_ND[rows].to(acc) * weight_N[rows, None])
        return out_TD.to(y_ND.dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, weight_N, token_N = ctx.saved_tensors
        need_y, need_weight, _, _ = ctx.needs_input_grad
        grad_ND, dweight_N = _rows_backward(grad_TD, y_ND, weight_N, token_N, need_y, need_weight)
        return grad_ND, dweight_N, None, None


class _SparseCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, weight_A, order_N, per_token):
        row_of_A = inverse_permutation(order_N)
        token_starts = torch.arange(0, order_N.numel() + 1, per_token, device=order_N.device)
        acc = accumulation_dtype(y_ND, weight_A)
        weights_TN = _csr(token_starts, row_of_A, weight_A.to(acc), y_ND.shape[0])
        ctx.save_for_backward(y_ND, weight_A, order_N)
        ctx.per_token = per_token
        with torch.autocast(y_ND.device.type, enabled=False):  # autocast would take the product to bf16
            if y_ND.dtype == acc:
                return weights_TN @ y_ND
            out_TD = y_ND.new_empty(weights_TN.shape[0], y_ND.shape[1])
            for columns in _slices(y_ND.shape[1], y_ND.shape[0] * acc.itemsize, cast=True):
                out_TD[:, columns] = weights_TN @ y_ND[:, columns].to(acc)
            return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, weight_A, order_N = ctx.saved_tensors
        need_y, need_weight, _, _ = ctx.needs_input_grad
        weight_N, token_N = weight_A.index_select(0, order_N), order_N // ctx.per_token
        grad_ND, dweight_N = _rows_backward(grad_TD, y_ND, weight_N, token_N, need_y, need_weight)
        dweight_A = inverse_order(dweight_N, order_N) if need_weight else None
        return grad_ND, dweight_A, None, None


def _rows_backward(grad_TD, y_ND, weight_N, token_N, need_y: bool, need_weight: bool):
    """Gradients of the rows (the token's gradient times the row's weight, in place on the gathered copy) and
    of the weights (row-by-row dot products of that gathered gradient with y, summed in the accumulation
    dtype), each in its input's dtype."""
    grad_ND = grad_TD.index_select(0, token_N)
    dweight_N = _row_dots(grad_ND, y_ND, accumulation_dtype(grad_ND, weight_N)) if need_weight else None
    if need_y:
        # One product per element and nothing summed: the weight rounded to the rows' dtype first costs one
        # more rounding (bf16: 2u instead of u) and keeps it one plain multiply (a mixed-dtype one took 12x
        # as long at the fine-grained shape, this CPU). It also keeps a weight's last fp32 bits, where a
        # layout's fp32 sums and one process's differ, out of every element of the rows' gradient: with
        # them, the pp2-ep2-dp2 bf16 layout of tests/multiproc/test_golden.py drifted past one bf16 rounding.
        grad_ND.mul_(weight_N.to(grad_ND.dtype)[:, None])
    return (grad_ND if need_y else None), dweight_N


def _row_dots(a_ND: torch.Tensor, b_ND: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """The N row-by-row dot products of `a_ND` and `b_ND`, each summed in `acc` [N]."""
    N, D = a_ND.shape
    dots_N = a_ND.new_empty(N, dtype=acc)
    for rows in _slices(N, D * acc.itemsize, a_ND.dtype != acc):
        # bmm of [c, 1, D] by [c, D, 1]: the dot products without a [c, D] product tensor.
        dots_N[rows] = torch.bmm(a_ND[rows].to(acc).unsqueeze(1), b_ND[rows].to(acc).unsqueeze(2)).view(-1)
    return dots_N


def _slices(length: int, bytes_per_item: int, cast: bool) -> list[slice]:
    """[0, length) in pieces of at most CAST_SLICE_BYTES when an item (a row or column) takes
    `bytes_per_item` in the accumulation dtype; in one piece where nothing is cast (fp32 rows)."""
    step = max(1, CAST_SLICE_BYTES // bytes_per_item) if cast else max(length, 1)
    return [slice(start, min(start + step, length)) for start in range(0, length, step)]
