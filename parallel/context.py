"""Context parallelism: each sequence split over the cp ranks, attention over keys and values gathered whole.

Shape legend: B batch rows, S sequence positions (the whole row), Sl = S / cp positions held by one rank.

Causal attention costs each query in proportion to its position, so cutting a row into cp contiguous pieces
would give the last rank most of the work. The row is cut into 2 cp chunks instead, and rank r holds chunks r
and 2 cp - 1 - r, one from either end (the load balance of Megatron-LM's and Llama 3's context parallelism):
every rank attends over the same number of (query, key) pairs.

Attention all-gathers keys and values over the cp group (Llama 3's choice over a ring: one collective per
layer, exact, and the mask is the one-process mask's rows for the local queries), and this rank's queries
attend to the whole row with a mask built from their global positions (moe/masking.py `context_mask`), so
causality and packed documents are exactly one process's. The gather's backward sums every rank's gradient
of the keys and values and hands each rank its own chunks (a reduce-scatter).

Everything else is per token: rotary angles are indexed by global positions (`ContextShard.positions_S`),
the loss is each rank's mean over as many tokens as every other rank, and cp ranks average gradients as
data-parallel ranks do (parallel/dims.py: the dense mesh's dp axis holds dp x cp ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def local_positions(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The positions of a row that cp rank `rank` holds, in the order it holds them: chunks r and 2 cp - 1 - r
    of 2 cp equal chunks. int64 [S / cp], e.g. seq_len 8, cp 2, rank 0 -> [0 1 6 7]."""
    chunk = seq_len // (2 * cp)
    assert chunk * 2 * cp == seq_len, (seq_len, cp)
    first, last = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(last, last + chunk)])


def split_sequence(x_BS: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """This rank's positions of rows `x_BS` [B, S, ...] -> [B, S / cp, ...] (contiguous)."""
    return x_BS[:, local_positions(x_BS.shape[1], cp, rank).to(x_BS.device)].contiguous()


def merge_sequence(parts: list[torch.Tensor]) -> torch.Tensor:
    """Every rank's [B, Sl, ...] in cp rank order -> the whole rows [B, S, ...] in position order: the first
    chunks of ranks 0 .. cp-1, then the second chunks of ranks cp-1 .. 0 (the inverse of `split_sequence`)."""
    halves = [p.chunk(2, dim=1) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=1)


class _GatherSequence(torch.autograd.Function):
    """All-gather of every rank's [B, Sl, ...] into whole rows; backward reduce-scatters the rows' gradient.

    Written by hand: torch's autograd-aware all-gathers concatenate in rank order (the load-balanced chunks
    need `merge_sequence`'s order) and their backward calls reduce_scatter_tensor, which gloo lacks; the list
    forms used here run on gloo and NCCL alike."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return merge_sequence(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        cp = dist.get_world_size(ctx.group)
        S = grad.shape[1]
        pieces = [grad[:, local_positions(S, cp, r).to(grad.device)].contiguous() for r in range(cp)]
        out = torch.empty_like(pieces[0])
        dist.reduce_scatter(out, pieces, group=ctx.group)
        return out, None


class ContextShard:
    """What the model needs to know of its share of every row (the `moe.attention.SequenceShard` protocol)."""

    def __init__(self, group: dist.ProcessGroup, seq_len: int, device: torch.device) -> None:
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.seq_len = seq_len
        self.positions_S = local_positions(seq_len, self.cp, self.rank).to(device)
        """int64 [Sl]: the global position of each token this rank holds."""

    def split(self, x_BS: torch.Tensor) -> torch.Tensor:
        """This rank's positions of whole rows [B, S, ...]."""
        return split_sequence(x_BS, self.cp, self.rank)

    def gather(self, x_BSl: torch.Tensor) -> torch.Tensor:
        """Every rank's positions of the rows, whole and in order: [B, Sl, ...] -> [B, S, ...] (autograd-aware)."""
        return _GatherSequence.apply(x_BSl, self.group)


def apply_cp(model: torch.nn.Module, shard: ContextShard | None) -> None:
    """Hands the model (a pipeline stage of it) and its attention modules this rank's share of every row."""
    if shard is None:
        return
    model.context = shard
    for block in model.layers.values():
        block.attention.context = shard
