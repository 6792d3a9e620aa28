"""The combine's weighted scatter-add: out[t] = sum of weight[n] * y[n] over the rows n of token t.

Shape legend: N expert output rows, A assignments, T tokens, D model dim, K assignments per token.

Written out by hand on CPU: autograd's backward of `out.index_add(0, token, y * weight[:, None])` makes two
more [N, D] tensors (the gradient times the weight and times y) and reduces one of them; on CPU every new
large tensor costs page faults as well as its pass over memory. This backward weights the rows' gradient
in place and takes the weights' gradient as a batched row-by-row dot product (no [N, D] product). Blocking
the passes into cache-sized pieces was measured too: faster on one thread, but at two threads on a loaded
machine its many small parallel regions lost more than the cache won. Compiled graphs and accelerators keep
the plain expression (the compiler fuses it).

Where the rows are every assignment of token-choice routing (dropless, one chunk), the CPU forward is one
sparse-times-dense product instead: a CSR matrix [T, A] holding each token's K weights at its rows' positions,
times y. torch's CPU kernel for it (MKL) writes each output row from one thread, needs no [N, D] weighted
copy and no serial index_add (torch's CPU index_add walks the indices on one thread): at the fine-grained
shape of benchmarks/moe_layer.py 2.0-2.2 ms against 15-21 ms for the weighted copy and index_add (this
CPU, 2 and 1 threads).
It also sums each token's rows in slot order, whatever order the rows arrive in. MKL's kernel takes fp32 and
fp64 only, and a build without MKL may have none: `sparse_product_runs` asks the build once per dtype, and
what it cannot multiply keeps the index_add.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch


def weighted_scatter_add(y_ND: torch.Tensor, weight_N: torch.Tensor, token_N: torch.Tensor, num_tokens: int):
    """[T, D] sums of `weight_N`-weighted rows `y_ND` by token `token_N` (int64), differentiable in y and weight."""
    if _hand_written(y_ND):
        return _WeightedScatterAdd.apply(y_ND, weight_N, token_N, num_tokens)
    return y_ND.new_zeros(num_tokens, y_ND.shape[-1]).index_add(0, token_N, y_ND * weight_N[:, None])


def combine_every_assignment(y_ND: torch.Tensor, weight_A: torch.Tensor, order_N: torch.Tensor, per_token: int):
    """[T, D] combine of rows `y_ND` that are all A = T*K assignments of token-major routing (assignment a
    belongs to token a // K), row n being assignment `order_N[n]`; differentiable in y and `weight_A`."""
    if _hand_written(y_ND) and sparse_product_runs(y_ND.dtype):
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
        return y_ND.new_zeros(num_tokens, y_ND.shape[-1]).index_add_(0, token_N, y_ND * weight_N[:, None])

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
        weights_TN = _csr(token_starts, row_of_A, weight_A, y_ND.shape[0])
        ctx.save_for_backward(y_ND, weight_A, order_N)
        ctx.per_token = per_token
        return weights_TN @ y_ND

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
    of the weights (row-by-row dot products of that gathered gradient with y)."""
    grad_ND = grad_TD.index_select(0, token_N)
    # bmm of [N, 1, D] by [N, D, 1]: the row dot products without an [N, D] product tensor.
    dweight_N = torch.bmm(grad_ND.unsqueeze(1), y_ND.unsqueeze(2)).view(-1) if need_weight else None
    return (grad_ND.mul_(weight_N[:, None]) if need_y else None), dweight_N
