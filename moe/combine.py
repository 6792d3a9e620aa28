"""The combine's weighted scatter-add: out[t] = sum of weight[n] * y[n] over the rows n of token t.

Shape legend: N expert output rows, T tokens, D model dim.

Written out by hand on CPU: autograd's backward of `out.index_add(0, token, y * weight[:, None])` makes two
more [N, D] tensors (the gradient times the weight and times y) and reduces one of them; on CPU every new
large tensor costs page faults as well as its pass over memory. This backward weights the rows' gradient
in place and takes the weights' gradient as a batched row-by-row dot product (no [N, D] product). Blocking
the passes into cache-sized pieces was measured too: faster on one thread, but at two threads on a loaded
machine its many small parallel regions lost more than the cache won. Compiled graphs and accelerators keep
the plain expression (the compiler fuses it).
"""

from __future__ import annotations

import torch


def weighted_scatter_add(y_ND: torch.Tensor, weight_N: torch.Tensor, token_N: torch.Tensor, num_tokens: int):
    """[T, D] sums of `weight_N`-weighted rows `y_ND` by token `token_N` (int64), differentiable in y and weight."""
    if y_ND.device.type == "cpu" and not torch.compiler.is_compiling():
        return _WeightedScatterAdd.apply(y_ND, weight_N, token_N, num_tokens)
    return y_ND.new_zeros(num_tokens, y_ND.shape[-1]).index_add(0, token_N, y_ND * weight_N[:, None])


class _WeightedScatterAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, weight_N, token_N, num_tokens):
        ctx.save_for_backward(y_ND, weight_N, token_N)
        return y_ND.new_zeros(num_tokens, y_ND.shape[-1]).index_add_(0, token_N, y_ND * weight_N[:, None])

    @staticmethod
    def backward(ctx, grad_TD):
        y_ND, weight_N, token_N = ctx.saved_tensors
        need_y, need_weight, _, _ = ctx.needs_input_grad
        grad_ND = grad_TD.index_select(0, token_N)
        # bmm of [N, 1, D] by [N, D, 1]: the row dot products without an [N, D] product tensor.
        dweight_N = torch.bmm(grad_ND.unsqueeze(1), y_ND.unsqueeze(2)).view(-1) if need_weight else None
        return grad_ND.mul_(weight_N[:, None]) if need_y else None, dweight_N, None, None
