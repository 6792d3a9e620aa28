"""Sync-free MoE dispatch (`moe.dispatch=static`): every buffer has a size known before the step.

The dynamic path (`moe.dispatcher`, `parallel/expert.py`) reads each layer's row counts on the host once, to
size its rows and all-to-alls exactly; that read keeps an MoE layer out of a CUDA graph and out of one
`torch.compile(fullgraph=True)` graph. Here every buffer is sized by a bound from the config and the batch's
shape, and the routing only decides which slot each row fills, on the device.

Shape legend: G sequences this rank holds, S tokens of each it holds (a slice of S * parts under a tensor-
parallel `SequenceSplit`), T = G*S, K top-k, A = T*K assignments, E experts, C slots per expert per
sequence, R = G*C rows per expert, D model dim, F expert hidden.

The bound (layout-independent). Each expert takes at most C = ceil(dispatch_capacity_factor * S_seq * K / E)
assignments of each whole sequence of S_seq tokens (null factor: C = S_seq, which nothing can overflow: a
token picks an expert at most once). Counted per sequence, like the router's capacity, it never depends on how
a batch is split over data-parallel ranks, micro-batches or tensor-parallel slices (whose decisions are made
on the gathered whole sequences), so one process with the same bound keeps exactly the same assignments.
A rank's buffer for one expert is then R = G * min(C, S) rows whatever the routing (a slice of S tokens holds
at most S assignments to one expert); padding rows are zeros that no output reads.

Overflow policy: the assignments past an expert's C slots in a sequence are dropped on the device, lowest
router weight first (the `probability` policy; equal weights: the later position first), after any drops of
the router's own capacity. They are never silent: the layer's `kept` statistics exclude them, so they count in
`dropped_frac` and the expert-load dashboard's dropped counts, read once per logging step. A dropped
assignment adds nothing to its token's output (the residual stream carries the token on, as with capacity).

Host synchronisations: none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeyard.moe.combine import plain_weighted_sum
from moeyard.moe.config import MoEConfig
from moeyard.moe.dispatcher import AlongsideFn, MoEOutput
from moeyard.moe.experts import GroupedExperts, autocast_dtype, clamped_swiglu
from moeyard.moe.router import Routing, SequenceSplit, capacity_keep_mask, count_per_expert


def slots_per_sequence(cfg: MoEConfig, seq_len: int) -> int:
    """C: the slots each expert has for the assignments of one whole sequence of `seq_len` tokens."""
    if cfg.dispatch_capacity_factor is None:
        return seq_len
    return min(seq_len, max(1, math.ceil(cfg.dispatch_capacity_factor * seq_len * cfg.top_k / cfg.num_experts)))


@dataclass(frozen=True)
class SlotPlan:
    """Where each assignment's row goes in the [E, R] buffer, decided on the device."""

    slot_A: torch.Tensor
    """Flat slot (expert * R + sequence * C + position) of each assignment; E * R (a scratch row) if dropped."""
    rows_per_expert: int
    """R = G * min(C, S)."""
    kept_E: torch.Tensor
    """Assignments kept per expert after the bound (int64 [E])."""
    overflow_E: torch.Tensor
    """Assignments the bound dropped per expert (int64 [E])."""


def bounded_experts(
    routing: Routing, G: int, S: int, K: int, capacity: int, split: SequenceSplit | None
) -> torch.Tensor:
    """The routing's experts with the assignments past `capacity` per expert and whole sequence set to E.

    Decided on whole sequences (gathered from the tensor-parallel slices), lowest router weight dropped first.
    """
    E = routing.routed_E.numel()
    parts, index = (split.parts, split.index) if split is not None else (1, 0)
    expert_GSK = routing.expert_idx_A.view(G, S, K)
    priority_GSK = -routing.weight_A.detach().view(G, S, K)
    if split is not None:
        expert_GSK, priority_GSK = split.gather(expert_GSK), split.gather(priority_GSK)
    # E + 1 bins: assignments the router already dropped (expert E) fill a bin of their own, taking no slot.
    keep_GN = capacity_keep_mask(expert_GSK.reshape(G, -1), priority_GSK.reshape(G, -1), E + 1, capacity)
    keep_A = keep_GN.view(G, S * parts, K)[:, index * S : (index + 1) * S].reshape(-1)
    return torch.where(keep_A, routing.expert_idx_A, E)


def plan_slots(routing: Routing, cfg: MoEConfig, seq_len: int, split: SequenceSplit | None) -> SlotPlan:
    """Applies the bound and gives every kept assignment its own slot: all on the device, shapes from the config."""
    E, K, A = cfg.num_experts, cfg.top_k, routing.expert_idx_A.numel()
    parts = split.parts if split is not None else 1
    G, S = A // (K * seq_len), seq_len
    capacity = slots_per_sequence(cfg, S * parts)
    expert_A = routing.expert_idx_A
    if capacity < S * parts:  # else nothing can overflow: skip the sort (and the gather of the slices)
        expert_A = bounded_experts(routing, G, S, K, capacity, split)
    C = min(capacity, S)
    seq_A = routing.token_idx_A // S
    # Position of each assignment among its (sequence, expert) group: a stable sort, no host read.
    key_A = seq_A * (E + 1) + expert_A
    order_A = key_A.argsort(stable=True)
    size_B = torch.zeros(G * (E + 1), dtype=torch.long, device=key_A.device)
    size_B.scatter_add_(0, key_A, torch.ones_like(key_A))
    start_B = size_B.cumsum(0) - size_B
    pos_sorted_A = torch.arange(A, device=key_A.device) - start_B[key_A[order_A]]
    pos_A = torch.empty_like(pos_sorted_A).scatter_(0, order_A, pos_sorted_A)
    R = G * C
    slot_A = torch.where(expert_A < E, expert_A * R + seq_A * C + pos_A, E * R)
    kept_E = count_per_expert(expert_A, E)
    return SlotPlan(slot_A, R, kept_E, routing.kept_E - kept_E)


def to_slots(x_TD: torch.Tensor, routing: Routing, plan: SlotPlan, num_experts: int) -> torch.Tensor:
    """The [E, R, D] buffer: each kept assignment's token in its slot, zeros elsewhere. Under autocast it holds
    the autocast dtype (the experts compute in it; an all-to-all moves half the bytes in bf16)."""
    T, D = x_TD.shape
    E, R = num_experts, plan.rows_per_expert
    # Which token fills each slot (T: the zero row); dropped assignments write the scratch slot E * R.
    token_B = torch.full((E * R + 1,), T, dtype=torch.long, device=x_TD.device)
    token_B = token_B.scatter(0, plan.slot_A, routing.token_idx_A)
    x_pad = torch.cat([x_TD, x_TD.new_zeros(1, D)])
    x_ERD = x_pad.index_select(0, token_B[: E * R]).view(E, R, D)
    # Cast after the gather, as the dynamic path does, so the gradients of a token's rows add up in fp32.
    dtype = autocast_dtype(x_TD.device.type)
    return x_ERD.to(dtype) if dtype is not None else x_ERD


def from_slots(y_ERD: torch.Tensor, routing: Routing, plan: SlotPlan, num_tokens: int) -> torch.Tensor:
    """Weighted sum of each token's kept rows [T, D]; dropped assignments read the scratch zero row."""
    D = y_ERD.shape[-1]
    y_pad = torch.cat([y_ERD.reshape(-1, D), y_ERD.new_zeros(1, D)])
    # Summed in fp32 like the dynamic combine (moe/combine.py `plain_weighted_sum`).
    return plain_weighted_sum(y_pad.index_select(0, plan.slot_A), routing.weight_A, routing.token_idx_A, num_tokens)


def padded_experts(experts: GroupedExperts, x_ERD: torch.Tensor) -> torch.Tensor:
    """The experts on R rows each [E, R, D] -> [E, R, D], as batched matmuls: no counts, no host read.

    Zero padding rows give outputs no combine reads, so their gradients are zero and the weights' gradients
    are the dynamic path's (with biases they output the bias, which is never read either)."""
    w1, w2, w3 = experts.w1, experts.w2, experts.w3
    dtype = autocast_dtype(x_ERD.device.type)
    if dtype is not None:  # as GroupedExperts.forward: autocast does not cover these matmuls' fp32 weights
        x_ERD, w1, w2, w3 = (t.to(dtype) for t in (x_ERD, w1, w2, w3))

    def bias(y_ERW: torch.Tensor, b_EW: torch.Tensor | None) -> torch.Tensor:
        return y_ERW if b_EW is None else y_ERW + b_EW.to(y_ERW.dtype)[:, None, :]

    gate_ERF, up_ERF = bias(torch.bmm(x_ERD, w1), experts.b1), bias(torch.bmm(x_ERD, w3), experts.b3)
    h_ERF = F.silu(gate_ERF) * up_ERF if experts.clamp is None else clamped_swiglu(gate_ERF, up_ERF, *experts.clamp)
    return bias(torch.bmm(h_ERF, w2), experts.b2)


class StaticDispatcher:
    """All experts on this device, every buffer sized by the bound: compiles whole, reads nothing on the host.

    `parallel/static_a2a.py` extends it across an expert-parallel group by overriding `_send`, `_arrive`, `_return`
    and `_received` with fixed-size all-to-alls.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.num_local_experts = cfg.num_experts
        self.sequence_split: SequenceSplit | None = None

    def reduce_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        return counts_E

    def run(
        self,
        x_TD: torch.Tensor,
        routing: Routing,
        experts: GroupedExperts,
        alongside: AlongsideFn | None,
        seq_len: int | None = None,
    ) -> MoEOutput:
        assert seq_len is not None, "static dispatch bounds each sequence: the layer passes seq_len"
        plan = plan_slots(routing, self.cfg, seq_len, self.sequence_split)
        in_flight = self._send(to_slots(x_TD, routing, plan, self.num_experts))
        side = alongside() if alongside is not None else None  # runs while the rows travel (ep > 1)
        y_ERD = self._return(padded_experts(experts, self._arrive(in_flight)))
        out_TD = from_slots(y_ERD, routing, plan, x_TD.shape[0])
        return MoEOutput(out_TD, self._received(plan.kept_E), side, overflow_E=plan.overflow_E)

    def _send(self, x_ERD: torch.Tensor) -> torch.Tensor:
        """Starts moving the rows to the experts that own them (nothing to move on one device)."""
        return x_ERD

    def _arrive(self, in_flight: torch.Tensor) -> torch.Tensor:
        """The rows each local expert received, [El, P * R, D] (the buffer itself on one device)."""
        return in_flight

    def _return(self, y_ElRD: torch.Tensor) -> torch.Tensor:
        """Expert outputs back to the rows' senders: [El, P * R, D] -> [E, R, D]."""
        return y_ElRD

    def _received(self, kept_E: torch.Tensor) -> torch.Tensor:
        """Real (not padding) rows each local expert processed [El]."""
        return kept_E
