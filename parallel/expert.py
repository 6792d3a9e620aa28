"""Expert parallelism: experts sharded over the "ep" mesh axis, tokens moved by all-to-all.

Under tensor parallelism the tp ranks do not repeat each other's MoE work ("parallel folding", as in
Megatron-Core): each routes and sends its slice of every sequence (the sequence-parallel split), and the
expert-parallel group may span the tp axis. Balancing counts are summed over every rank holding tokens of the
micro-batch (dp x tp), and capacity is decided on whole sequences from the slices' top-k decisions.

Shape legend: T tokens, A candidate assignments, N rows sent, D model dim, E experts, P = ep ranks,
El = E / ep local experts, C chunks, R rows received by this rank.

The dispatcher owns dispatch -> experts -> combine (the `moe.dispatcher` protocol), so the overlap of
communication with the shared experts or with another chunk's expert matmuls lives here, not in `moe/`.
Permutations and regrouping are built on the device; the only host read is the row counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moeyard.moe.combine import inverse_permutation
from moeyard.moe.dispatcher import AlongsideFn, ExpertsFn, LocalDispatcher, MoEOutput, combine_rows, gather_rows
from moeyard.moe.experts import GroupedExperts, autocast_dtype
from moeyard.moe.model import Transformer
from moeyard.moe.router import Routing
from moeyard.parallel.static_a2a import StaticAllToAllDispatcher, StaticDataParallelDispatcher


def _sum_over(group: dist.ProcessGroup | None, counts_E: torch.Tensor) -> torch.Tensor:
    """All-reduce of integer routing counts (no gradient flows through counts)."""
    if group is None:
        return counts_E
    total = counts_E.clone()
    dist.all_reduce(total, group=group)
    return total


class TensorParallelSplit:
    """This tp rank's slice of every sequence (a `moe.router.SequenceSplit` over the tp group), or under
    context parallelism this (cp, tp) rank's (over the cp x tp group, tp innermost; `summed`: tp)."""

    def __init__(self, tp_group: dist.ProcessGroup, summed: int | None = None) -> None:
        self.group = tp_group
        self.parts = dist.get_world_size(tp_group)
        self.index = dist.get_rank(tp_group)
        self.summed = self.parts if summed is None else summed

    @torch.no_grad()
    def gather(self, t_GS: torch.Tensor) -> torch.Tensor:
        pieces = [torch.empty_like(t_GS) for _ in range(self.parts)]
        dist.all_gather(pieces, t_GS.contiguous(), group=self.group)
        return torch.cat(pieces, dim=1)

    @torch.no_grad()
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return _sum_over(self.group, t)


class DataParallelDispatcher(LocalDispatcher):
    """All experts local; balancing counts are still summed over every rank holding tokens of the batch."""

    def __init__(
        self, num_experts: int, token_group: dist.ProcessGroup | None, split: TensorParallelSplit | None = None
    ) -> None:
        super().__init__(num_experts)
        self.token_group = token_group
        self.sequence_split = split

    def reduce_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        return _sum_over(self.token_group, counts_E)


def source_to_expert_order(counts_PEl: torch.Tensor, total: int) -> torch.Tensor:
    """Row index reordering received rows from (source rank, local expert) to (local expert, source rank).

    Built on the device from the received counts: row i of expert-major segment (e, p) is row
    `start of (p, e) in source order + (i - start of (e, p) in expert order)`. `total` (the row count,
    known on the host) sizes `repeat_interleave` so it need not read the device.
    """
    P, El = counts_PEl.shape
    flat_PEl = counts_PEl.flatten()
    src_start_EP = (flat_PEl.cumsum(0) - flat_PEl).view(P, El).t().flatten()
    counts_EP = counts_PEl.t().flatten()
    dst_start_EP = counts_EP.cumsum(0) - counts_EP
    segment_R = torch.repeat_interleave(torch.arange(P * El, device=counts_PEl.device), counts_EP, output_size=total)
    return src_start_EP[segment_R] + torch.arange(total, device=counts_PEl.device) - dst_start_EP[segment_R]


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk's rows: which sorted assignments it sends, and the row counts of its two all-to-alls."""

    order_N: torch.Tensor
    """Indices into the Routing's assignments, grouped by destination rank and expert [N]."""
    input_splits: list[int]
    output_splits: list[int]
    regroup_R: torch.Tensor
    """Received rows in (local expert, source) order [R]."""
    received_El: torch.Tensor
    """Rows per local expert (int64 [El])."""


class AllToAllDispatcher:
    """Sends each assignment to the ep rank owning its expert and brings the outputs back.

    `overlap`: "none" runs dispatch, experts, combine, then the shared experts; "shared" runs the shared
    experts while the dispatch all-to-all is in flight; "chunked" cuts the layer's tokens into `chunks`
    groups so one group's all-to-alls travel while another's experts compute. All three compute the same
    rows with the same weights: they give the same losses and gradients.

    One host synchronisation per layer (all chunks' row counts, read together). Backward all-to-alls are
    waited inside autograd (torch's functional collective), so only the forward overlaps.
    """

    def __init__(
        self,
        num_experts: int,
        ep_group: dist.ProcessGroup,
        token_group: dist.ProcessGroup | None,
        split: TensorParallelSplit | None = None,
        overlap: str = "none",
        chunks: int = 2,
    ) -> None:
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_group = ep_group
        self.token_group = token_group
        self.sequence_split = split
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.overlap = overlap
        self.chunks = chunks if overlap == "chunked" else 1

    def reduce_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        return _sum_over(self.token_group, counts_E)

    def run(
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        experts: ExpertsFn,
        alongside: AlongsideFn | None,
        seq_len: int | None = None,
    ) -> MoEOutput:
        plans = self._plan(routing, x_TD.shape[0])
        in_flight = [self._send(self._rows(x_TD, routing, plan), plan) for plan in plans]
        side = alongside() if alongside is not None and self.overlap != "none" else None
        returning = []
        for plan, rows in zip(plans, in_flight, strict=True):
            x_RD = funcol.wait_tensor(rows).index_select(0, plan.regroup_R)
            y_RD = experts(x_RD, plan.received_El)
            y_source_RD = y_RD.index_select(0, inverse_permutation(plan.regroup_R))
            returning.append(self._all_to_all(y_source_RD, plan.input_splits, plan.output_splits))
        out_TD = None
        for plan, back in zip(plans, returning, strict=True):
            part_TD = combine_rows(funcol.wait_tensor(back), routing, plan.order_N, x_TD.shape[0])
            out_TD = part_TD if out_TD is None else out_TD + part_TD
        if alongside is not None and side is None:
            side = alongside()
        received_El = torch.stack([plan.received_El for plan in plans]).sum(0)
        return MoEOutput(out_TD, received_El, side)

    @staticmethod
    def _rows(x_TD: torch.Tensor, routing: Routing, plan: ChunkPlan) -> torch.Tensor:
        """The rows a chunk sends, in the autocast dtype under autocast: the experts compute in it anyway, and
        bf16 halves the all-to-all. Cast after the gather, as the local path does, so the gradients of a
        token's rows still add up in fp32."""
        rows_ND = gather_rows(x_TD, routing, plan.order_N)
        dtype = autocast_dtype(x_TD.device.type)
        return rows_ND.to(dtype) if dtype is not None else rows_ND

    def _plan(self, routing: Routing, num_tokens: int) -> list[ChunkPlan]:
        """Every chunk's send order and row counts, from one exchange of counts and one host read."""
        E, P, El, C = self.num_experts, self.ep_size, self.num_local_experts, self.chunks
        # Sort key (chunk, expert): chunk c holds tokens [c*T/C, (c+1)*T/C); dropped assignments (expert E)
        # sort last within their chunk.
        chunk_A = routing.token_idx_A * C // num_tokens
        key_A = chunk_A * (E + 1) + routing.expert_idx_A
        order_A = key_A.argsort(stable=True)
        bins_CE1 = torch.zeros(C * (E + 1), dtype=torch.long, device=key_A.device)
        bins_CE1 = bins_CE1.scatter_add_(0, key_A, torch.ones_like(key_A)).view(C, E + 1)
        send_PCEl = bins_CE1[:, :E].reshape(C, P, El).transpose(0, 1).contiguous()
        recv_PCEl = torch.empty_like(send_PCEl)
        dist.all_to_all_single(recv_PCEl, send_PCEl, group=self.ep_group)
        # The layer's one host synchronisation: the row counts every all-to-all of this layer is sized by.
        host = torch.cat([bins_CE1.flatten(), recv_PCEl.flatten()]).tolist()
        bins = [host[c * (E + 1) : (c + 1) * (E + 1)] for c in range(C)]
        recv = host[C * (E + 1) :]  # [P, C, El] flattened
        plans, start = [], 0
        for c in range(C):
            input_splits = [sum(bins[c][p * El : (p + 1) * El]) for p in range(P)]
            output_splits = [sum(recv[(p * C + c) * El : (p * C + c + 1) * El]) for p in range(P)]
            kept = sum(input_splits)
            counts_PEl = recv_PCEl[:, c]
            plans.append(
                ChunkPlan(
                    order_N=order_A[start : start + kept],
                    input_splits=input_splits,
                    output_splits=output_splits,
                    regroup_R=source_to_expert_order(counts_PEl, sum(output_splits)),
                    received_El=counts_PEl.sum(0),
                )
            )
            start += sum(bins[c])
        return plans

    def _send(self, x_ND: torch.Tensor, plan: ChunkPlan) -> torch.Tensor:
        """Starts the dispatch all-to-all; the result is waited on where it is used."""
        return funcol.all_to_all_single_autograd(
            x_ND.contiguous(), plan.output_splits, plan.input_splits, self.ep_group
        )

    def _all_to_all(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        return funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, self.ep_group)


def apply_ep(
    model: Transformer,
    ep_group: dist.ProcessGroup | None,
    token_group: dist.ProcessGroup | None,
    tp_group: dist.ProcessGroup | None = None,
    overlap: str = "none",
    chunks: int = 2,
    summed: int | None = None,
) -> None:
    """Shrinks every MoE layer to its local experts and installs the matching dispatcher (meta device).

    `token_group`: every rank holding tokens of the micro-batch (dp x cp x tp); `tp_group`: set when ranks
    each route a slice of every sequence (the tp ranks, or the cp x tp ranks under context parallelism, of
    which `summed` = tp sum their router gradients); `overlap`, `chunks`: see AllToAllDispatcher (ep > 1 only).
    """
    ep = dist.get_world_size(ep_group) if ep_group is not None else 1
    split = TensorParallelSplit(tp_group, summed) if tp_group is not None else None
    for moe in model.moe_layers().values():
        cfg = moe.cfg
        static = cfg.dispatch == "static"  # buffers sized from the config: parallel/static_a2a.py
        if ep == 1:
            if static:
                moe.dispatcher = StaticDataParallelDispatcher(cfg, token_group, split)
            else:
                moe.dispatcher = DataParallelDispatcher(cfg.num_experts, token_group, split)
            continue
        old = moe.experts
        with torch.device(old.w1.device):
            moe.experts = GroupedExperts.from_config(cfg, cfg.num_experts // ep, old.w1.shape[1])
        if static:
            moe.dispatcher = StaticAllToAllDispatcher(cfg, ep_group, token_group, split)
        else:
            moe.dispatcher = AllToAllDispatcher(cfg.num_experts, ep_group, token_group, split, overlap, chunks)
