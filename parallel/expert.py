"""Expert parallelism: experts sharded over the "ep" mesh axis, tokens moved by all-to-all.

Under tensor parallelism the tp ranks do not repeat each other's MoE work ("parallel folding", as in
Megatron-Core): each routes and sends its slice of every sequence (the sequence-parallel split), and the
expert-parallel group may span the tp axis. Balancing counts are summed over every rank holding tokens of the
micro-batch (dp x tp), and capacity is decided on whole sequences from the slices' top-k decisions.

Shape legend: T tokens, A kept assignments, D model dim, E experts, El = E / ep local experts,
R rows received by this rank.

The dispatcher keeps three phases apart (local permutation, the collective, local re-grouping) so that
compute/communication overlap can be added here without touching `moe/`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moe.dispatcher import DispatchMeta, LocalDispatcher, permute_by_expert, unpermute_and_combine
from moe.experts import GroupedExperts
from moe.model import Transformer
from moe.router import Routing


def _sum_over(group: dist.ProcessGroup | None, counts_E: torch.Tensor) -> torch.Tensor:
    """All-reduce of integer routing counts (no gradient flows through counts)."""
    if group is None:
        return counts_E
    total = counts_E.clone()
    dist.all_reduce(total, group=group)
    return total


class TensorParallelSplit:
    """This tp rank's slice of every sequence (a `moe.router.SequenceSplit` over the tp group)."""

    def __init__(self, tp_group: dist.ProcessGroup) -> None:
        self.group = tp_group
        self.parts = dist.get_world_size(tp_group)
        self.index = dist.get_rank(tp_group)

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


class AllToAllDispatcher:
    """Sends each assignment to the ep rank owning its expert and brings the outputs back."""

    def __init__(
        self,
        num_experts: int,
        ep_group: dist.ProcessGroup,
        token_group: dist.ProcessGroup | None,
        split: TensorParallelSplit | None = None,
    ) -> None:
        self.ep_size = dist.get_world_size(ep_group)
        self.ep_group = ep_group
        self.token_group = token_group
        self.sequence_split = split
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    def reduce_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        return _sum_over(self.token_group, counts_E)

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        # 1. local: sort assignments by global expert; experts of ep rank r are the r-th block of El.
        x_AD, sort_order_A = permute_by_expert(x_TD, routing)
        send_counts_E = torch.bincount(routing.expert_idx_A, minlength=self.num_experts)
        # 2. collectives: how many rows each source sends to each of my local experts, then the rows.
        recv_counts_PEl = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts_PEl, send_counts_E, group=self.ep_group)
        recv_counts_PEl = recv_counts_PEl.view(self.ep_size, self.num_local_experts)
        input_splits = send_counts_E.view(self.ep_size, -1).sum(1).tolist()
        output_splits = recv_counts_PEl.sum(1).tolist()
        x_RD = self._all_to_all(x_AD, output_splits, input_splits)
        # 3. local: rows arrive grouped (source, expert); the grouped matmul wants (expert, source).
        source_R = torch.arange(self.ep_size).repeat_interleave(self.num_local_experts)
        expert_R = torch.arange(self.num_local_experts).repeat(self.ep_size)
        segment_key = (expert_R * self.ep_size + source_R).repeat_interleave(recv_counts_PEl.flatten().cpu())
        regroup_R = segment_key.argsort(stable=True).to(x_RD.device)
        meta = DispatchMeta(
            sort_order_A=sort_order_A,
            num_tokens=x_TD.shape[0],
            extra=(input_splits, output_splits, regroup_R),
        )
        return x_RD[regroup_R], recv_counts_PEl.sum(0), meta

    def combine(self, y_RD: torch.Tensor, routing: Routing, meta: DispatchMeta) -> torch.Tensor:
        input_splits, output_splits, regroup_R = meta.extra
        y_source_order = y_RD.index_select(0, regroup_R.argsort())
        y_AD = self._all_to_all(y_source_order, input_splits, output_splits)
        return unpermute_and_combine(y_AD, routing, meta)

    def _all_to_all(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        out = funcol.all_to_all_single_autograd(x.contiguous(), output_splits, input_splits, self.ep_group)
        return funcol.wait_tensor(out)


def apply_ep(
    model: Transformer,
    ep_group: dist.ProcessGroup | None,
    token_group: dist.ProcessGroup | None,
    tp_group: dist.ProcessGroup | None = None,
) -> None:
    """Shrinks every MoE layer to its local experts and installs the matching dispatcher (meta device).

    `token_group`: every rank holding tokens of the micro-batch (dp x tp); `tp_group`: set when tp ranks
    each route a slice of every sequence.
    """
    ep = dist.get_world_size(ep_group) if ep_group is not None else 1
    split = TensorParallelSplit(tp_group) if tp_group is not None else None
    for moe in model.moe_layers().values():
        cfg = moe.cfg
        if ep == 1:
            moe.dispatcher = DataParallelDispatcher(cfg.num_experts, token_group, split)
            continue
        old = moe.experts
        with torch.device(old.w1.device):
            moe.experts = GroupedExperts(cfg.num_experts // ep, old.w1.shape[1], old.w1.shape[2], cfg.grouped_mm)
        moe.dispatcher = AllToAllDispatcher(cfg.num_experts, ep_group, token_group, split)
