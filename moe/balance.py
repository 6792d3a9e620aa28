"""Global-batch load balancing (`moe.balance_scope=global_batch`): one MoE layer's routed counts over the step.

The Switch balancing loss E * sum_e f_e * P_e is meant over every token of the step (Qwen, "Demons in the
Detail", 2025): f_e, the share of assignments routed to expert e, over all micro-batches and all dp x tp
ranks. Its gradient only needs f as a constant, but the step's f is known only after the last micro-batch's
forward, and micro-batch 0's backward runs before that (gradient accumulation, every pipeline schedule).
Knowing it first would take a second forward of the whole step (a third more compute), and deferring the
gradient would keep every micro-batch's graph alive (the memory micro-batching exists to save): neither is
cheap, so this is not exact. Micro-batch m (in forward order) uses the counts of micro-batches 0..m of the
step, summed over every rank holding their tokens: Megatron-Core's `global_aux_loss` running buffer. The
last micro-batch sees the whole step's f; with one micro-batch per step it is the exact global-batch loss.
The definition depends only on which rows make up each micro-batch, the same in every layout, so every
layout trains like one process.

Activation checkpointing runs a block's forward again inside its backward; that recompute must see the
counts its forward saw (not the step's later ones) and must not count them again. Every schedule runs a
stage's backwards in micro-batch order (gradient accumulation, GPipe, 1F1B, interleaved 1F1B), so the k-th
recompute of a layer in a step is its micro-batch k; it replays that entry and checks on the device that it
routed the same tokens as the forward did.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LoadReducer = Callable[[torch.Tensor], torch.Tensor]
"""Sums per-expert counts over every rank holding tokens of the micro-batch."""


def recomputing() -> bool:
    """True while autograd runs a backward pass: a forward here is an activation-checkpoint recompute.

    Eager only: torch.compile cannot trace this query (a graph break)."""
    return torch._C._current_graph_task_id() != -1


class StepLoad:
    """Routed counts of the micro-batches of the running step so far, for one MoE layer (int64 [E] each)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """A new step: no micro-batch counted yet."""
        self.local_E: list[torch.Tensor] = []
        """This rank's counts of micro-batch m, to check a recompute against."""
        self.running_E: list[torch.Tensor] = []
        """Counts of micro-batches 0..m over every rank holding their tokens."""
        self.replayed = 0
        """Recomputes of this step so far: the next one is micro-batch `replayed`."""

    def counts(
        self, routed_E: torch.Tensor, reduce_load: Callable[[torch.Tensor], torch.Tensor] | None
    ) -> torch.Tensor:
        """The counts micro-batch m's f comes from: this micro-batch's `routed_E` summed over the ranks
        (`reduce_load`) and added to the step's so far; in a recompute, what its forward returned."""
        if recomputing():
            return self._replay(routed_E)
        total_E = reduce_load(routed_E) if reduce_load is not None else routed_E
        if self.running_E:
            total_E = self.running_E[-1] + total_E
        self.local_E.append(routed_E)
        self.running_E.append(total_E)
        return total_E

    def _replay(self, routed_E: torch.Tensor) -> torch.Tensor:
        m = self.replayed
        assert m < len(self.running_E), f"recompute {m} of a step that ran {len(self.running_E)} forwards"
        # A schedule that ran backwards out of micro-batch order would train on another micro-batch's f.
        same = (routed_E == self.local_E[m]).all()
        torch._assert_async(same, "balance_scope=global_batch: a recompute routed other tokens than its forward")
        self.replayed += 1
        return self.running_E[m]
