"""Expert parallelism for `moe.dispatch=static`: all-to-alls of a size fixed before the step.

Every ep rank sends each peer R rows per expert the peer owns (R = G * C from the bound of
`moe/static_dispatch.py`, padding included), so the splits are equal and known from the shapes: no exchange of
counts and no host read, and the layer compiles with fullgraph=True. Received rows are regrouped by local
expert as a reshape, not a permutation, and the experts run as batched matmuls. The shared experts run while
the dispatch all-to-all travels (its result is waited on where it is used).

Every rank of the ep group must hold the same number of sequences of the same length (every micro-batch of a
step has one shape), so the R each sends is the R each expects.

Shape legend: E experts, P ep ranks, El = E / P local experts, R rows per expert per sender, D model dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moeyard.moe.config import MoEConfig
from moeyard.moe.router import SequenceSplit
from moeyard.moe.static_dispatch import StaticDispatcher


class StaticDataParallelDispatcher(StaticDispatcher):
    """All experts local; balancing counts summed over every rank holding tokens of the batch."""

    def __init__(self, cfg: MoEConfig, token_group: dist.ProcessGroup | None, split: SequenceSplit | None) -> None:
        super().__init__(cfg)
        self.token_group = token_group
        self.sequence_split = split

    def reduce_load(self, counts_E: torch.Tensor) -> torch.Tensor:
        if self.token_group is None:
            return counts_E
        return funcol.all_reduce(counts_E, "sum", self.token_group)


class StaticAllToAllDispatcher(StaticDataParallelDispatcher):
    """Experts sharded over the ep group; rows travel in two equal-split all-to-alls, counts in one more."""

    def __init__(
        self,
        cfg: MoEConfig,
        ep_group: dist.ProcessGroup,
        token_group: dist.ProcessGroup | None,
        split: SequenceSplit | None,
    ) -> None:
        super().__init__(cfg, token_group, split)
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group)
        self.num_local_experts = cfg.num_experts // self.ep_size

    def _send(self, x_ERD: torch.Tensor) -> torch.Tensor:
        """Starts the dispatch all-to-all of [E, R, D] (peer p's experts are rows p*El..): R rows per expert to
        each peer. Waited on in `_arrive`, after the shared experts."""
        E, R, D = x_ERD.shape
        return funcol.all_to_all_single_autograd(x_ERD.reshape(E * R, D), None, None, self.ep_group)

    def _arrive(self, in_flight: torch.Tensor) -> torch.Tensor:
        """[P * El * R, D] received -> [El, P * R, D], senders in rank order."""
        P, El, D = self.ep_size, self.num_local_experts, in_flight.shape[-1]
        return funcol.wait_tensor(in_flight).view(P, El, -1, D).transpose(0, 1).reshape(El, -1, D)

    def _return(self, y_ElRD: torch.Tensor) -> torch.Tensor:
        """[El, P * R, D] -> [E, R, D]: each sender gets its rows back in the slots it filled."""
        El, PR, D = y_ElRD.shape
        P = self.ep_size
        y_PElRD = y_ElRD.view(El, P, PR // P, D).transpose(0, 1).reshape(P * El * (PR // P), D)
        back = funcol.all_to_all_single_autograd(y_PElRD, None, None, self.ep_group)
        return funcol.wait_tensor(back).view(self.num_experts, PR // P, D)

    def _received(self, kept_E: torch.Tensor) -> torch.Tensor:
        """Real rows per local expert, summed over the senders (one all-to-all of E counts)."""
        recv_PEl = funcol.all_to_all_single(kept_E, None, None, self.ep_group)
        return funcol.wait_tensor(recv_PEl).view(self.ep_size, self.num_local_experts).sum(0)
