"""Dispatcher protocol (dispatch -> metadata -> combine) and the single-device implementation.

A dispatcher moves the kept assignments of a Routing to the experts that own them, grouped by expert, and
brings the expert outputs back in token order. Each implementation keeps three phases apart (local
permutation, the collective, local un-permutation) so communication can later overlap with compute.
The expert-parallel all-to-all dispatcher lives in `parallel/expert.py` and follows the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moe.router import Routing, SequenceSplit


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs to undo dispatch; `extra` carries an implementation's own bookkeeping."""

    sort_order_A: torch.Tensor
    """Permutation putting the assignments in expert order (int64 [A])."""
    num_tokens: int
    """T, the rows of the combined output."""
    extra: object = None


class Dispatcher(Protocol):
    """Moves tokens to local experts and back."""

    num_local_experts: int
    sequence_split: SequenceSplit | None
    """Set when this rank's tokens are one slice of each sequence (tensor-parallel ranks sharing the work)."""

    def reduce_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Sum per-expert routing counts over every rank whose tokens form this batch."""
        ...

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        """Returns tokens grouped by local expert [N, D], tokens per local expert [E_local], metadata."""
        ...

    def combine(self, y_ND: torch.Tensor, routing: Routing, meta: DispatchMeta) -> torch.Tensor:
        """Weighted sum of expert outputs back in token order [T, D]."""
        ...


def permute_by_expert(x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Gathers the assigned tokens in expert order; returns them [A, D] and the sort order [A]."""
    sort_order_A = routing.expert_idx_A.argsort(stable=True)
    return x_TD[routing.token_idx_A[sort_order_A]], sort_order_A


def unpermute_and_combine(y_AD: torch.Tensor, routing: Routing, meta: DispatchMeta) -> torch.Tensor:
    """Scatters expert outputs [A, D] (expert order) back to tokens, weighted by the router [T, D]."""
    token_A = routing.token_idx_A[meta.sort_order_A]
    weight_A = routing.weight_A[meta.sort_order_A].to(y_AD.dtype)
    out_TD = y_AD.new_zeros(meta.num_tokens, y_AD.shape[-1])
    return out_TD.index_add(0, token_A, y_AD * weight_A[:, None])


class LocalDispatcher:
    """All experts live on this device: dispatch is a permutation, combine its inverse."""

    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts
        self.sequence_split: SequenceSplit | None = None

    def reduce_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        return counts_E

    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor, DispatchMeta]:
        x_AD, sort_order_A = permute_by_expert(x_TD, routing)
        counts_E = torch.bincount(routing.expert_idx_A, minlength=self.num_local_experts)
        return x_AD, counts_E, DispatchMeta(sort_order_A=sort_order_A, num_tokens=x_TD.shape[0])

    def combine(self, y_AD: torch.Tensor, routing: Routing, meta: DispatchMeta) -> torch.Tensor:
        return unpermute_and_combine(y_AD, routing, meta)
