"""Dispatcher protocol (route tokens to experts and back) and the single-device implementation.

A dispatcher moves the kept assignments of a Routing to the experts that own them, grouped by expert, runs
the experts, and brings their outputs back in token order, weighted by the router. It owns the whole
dispatch -> experts -> combine sequence so that an implementation can overlap its communication with
compute (the shared experts, or another chunk's expert matmuls) without the model knowing. The
expert-parallel all-to-all dispatcher lives in `parallel/expert.py` and follows the same protocol.

Host synchronisations: none when the kept count is known from the shapes (dropless routing), else one
(the kept count) per layer. `moe.dispatch=static` (`moe/static_dispatch.py`) reads none, whatever the routing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from moeyard.moe.combine import combine_every_assignment, weighted_scatter_add
from moeyard.moe.router import Routing, SequenceSplit, count_per_expert

ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Runs the local experts on expert-sorted rows [N, D] given rows per local expert [E_local] -> [N, D]."""
AlongsideFn = Callable[[], torch.Tensor]
"""Work independent of the routed experts (the shared experts), run while tokens are in flight."""


@dataclass(frozen=True)
class MoEOutput:
    """What a dispatcher's `run` returns."""

    out_TD: torch.Tensor
    """Weighted sum of the routed experts' outputs, in token order [T, D]."""
    received_E: torch.Tensor
    """Rows this rank's local experts processed, per local expert (int64 [E_local])."""
    alongside: torch.Tensor | None
    """The result of the `alongside` work, if any."""
    overflow_E: torch.Tensor | None = None
    """Assignments the dispatcher itself dropped past its buffers, per expert (int64 [E]; `moe.static_dispatch`);
    None where it drops none. The layer counts them as dropped."""


class Dispatcher(Protocol):
    """Moves tokens to local experts, runs them, and brings the outputs back."""

    num_local_experts: int
    sequence_split: SequenceSplit | None
    """Set when this rank's tokens are one slice of each sequence (tensor-parallel ranks sharing the work)."""

    def reduce_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Sum per-expert routing counts over every rank whose tokens form this batch."""
        ...

    def run(
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        experts: ExpertsFn,
        alongside: AlongsideFn | None,
        seq_len: int | None = None,
    ) -> MoEOutput:
        """Dispatch, experts, combine; `alongside` runs exactly once, where it best hides communication.
        `seq_len`: tokens per sequence in `x_TD` (this rank's slice), for dispatchers that bound each sequence."""
        ...


def expert_order(routing: Routing, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assignment order grouped by expert, dropped assignments last, and kept rows per expert [E]."""
    return routing.expert_idx_A.argsort(stable=True), count_per_expert(routing.expert_idx_A, num_experts)


def kept_count(routing: Routing, counts_E: torch.Tensor) -> int:
    """The number of kept assignments: from the shapes when dropless, else the layer's one host read."""
    return routing.num_kept if routing.num_kept is not None else int(counts_E.sum())


def gather_rows(x_TD: torch.Tensor, routing: Routing, order_A: torch.Tensor) -> torch.Tensor:
    """The tokens of the assignments `order_A` selects, in that order [N, D]."""
    return x_TD.index_select(0, routing.token_idx_A.index_select(0, order_A))


def combine_rows(y_ND: torch.Tensor, routing: Routing, order_A: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Scatters expert outputs [N, D] (in `order_A`'s order) back to tokens, weighted by the router [T, D]
    (its fp32 weights, summed in fp32 whatever the rows' dtype: moe/combine.py)."""
    if routing.per_token is not None and order_A.numel() == routing.weight_A.numel():
        return combine_every_assignment(y_ND, routing.weight_A, order_A, routing.per_token)
    token_N = routing.token_idx_A.index_select(0, order_A)
    weight_N = routing.weight_A.index_select(0, order_A)
    return weighted_scatter_add(y_ND, weight_N, token_N, num_tokens)


class LocalDispatcher:
    """All experts live on this device: dispatch is a permutation, combine its inverse."""

    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts
        self.sequence_split: SequenceSplit | None = None

    def reduce_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        return counts_E

    def run(
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        experts: ExpertsFn,
        alongside: AlongsideFn | None,
        seq_len: int | None = None,
    ) -> MoEOutput:
        order_A, counts_E = expert_order(routing, self.num_local_experts)
        kept_N = order_A[: kept_count(routing, counts_E)]
        y_ND = experts(gather_rows(x_TD, routing, kept_N), counts_E)
        out_TD = combine_rows(y_ND, routing, kept_N, x_TD.shape[0])
        return MoEOutput(out_TD, counts_E, alongside() if alongside is not None else None)
