"""The MoE feed-forward layer: route, dispatch, run experts, combine, plus shared experts (optionally gated).

Shape legend: B sequences, S tokens per sequence, T = B*S, D model dim, N dispatched rows, E experts.

Balancing losses never travel through the model's output: each layer attaches its weighted aux/z losses to
its output's autograd graph (as Megatron's MoEAuxLossAutoScaler does), so they are counted once per layer and
micro-batch whatever the pipeline split, and the trainer's gradient averaging treats them like the LM loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeyard.moe.balance import recomputing
from moeyard.moe.config import MoEConfig
from moeyard.moe.dispatcher import Dispatcher, LocalDispatcher, MoEOutput
from moeyard.moe.experts import GroupedExperts
from moeyard.moe.router import Router, Routing
from moeyard.moe.static_dispatch import StaticDispatcher


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `out`; in backward, seeds d(aux)/d(aux) = 1 so the aux term's gradient flows."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype, device = ctx.aux_meta
        return grad_out, torch.ones(shape, dtype=dtype, device=device)


class MoELayer(nn.Module):
    """Token routing to E SwiGLU experts (optionally plus always-on shared experts, optionally gated per token)."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts.from_config(cfg, cfg.num_experts, dim)
        cfg.check_shared()
        self.shared_experts = SwiGLU(dim, cfg.shared_hidden) if cfg.shared_hidden else None
        # Qwen2-MoE's gate: one logit per token, sigmoid-squashed, scales the shared experts' output.
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        self.dispatcher: Dispatcher = (
            StaticDispatcher(cfg) if cfg.dispatch == "static" else LocalDispatcher(cfg.num_experts)
        )
        self.stats: list[dict[str, torch.Tensor]] = []
        """Detached per-forward routing statistics, drained by the trainer after each step."""
        self.pending_stats: dict[str, torch.Tensor] | None = None
        """A compiled forward's statistics, moved into `stats` by `take_pending_stats` after the block."""

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        split = self.dispatcher.sequence_split  # set when tensor-parallel ranks each hold a slice of S
        routing = self.router(x_BSD, reduce_load=self.dispatcher.reduce_load, split=split)
        x_TD = x_BSD.reshape(B * S, D)
        # The shared experts do not depend on the routing: the dispatcher runs them while tokens travel.
        alongside = (lambda: self._shared(x_TD)) if self.shared_experts is not None else None
        result = self.dispatcher.run(x_TD, routing, self.experts, alongside, seq_len=S)
        out_TD = result.out_TD
        if result.alongside is not None:
            out_TD = out_TD + result.alongside
        weighted_aux = (
            self.cfg.aux_loss_coef * routing.aux_loss
            + self.cfg.seq_aux_loss_coef * routing.seq_aux_loss
            + self.cfg.z_loss_coef * routing.z_loss
        )
        if split is not None:
            # Each slice's terms estimate the whole sequence's, and the ranks' router gradients are summed:
            # weighting by 1/parts makes that sum the gradient of their mean.
            weighted_aux = weighted_aux / split.summed
        if torch.is_grad_enabled() and weighted_aux.requires_grad:
            out_TD = _AttachAuxLoss.apply(out_TD, weighted_aux)
        self._record(self._stats(routing, result))
        return out_TD.view(B, S, D)

    def _record(self, stats: dict[str, torch.Tensor]) -> None:
        """Keeps one forward's statistics, but none of an activation-checkpoint recompute.

        Under torch.compile an append to `self.stats` would guard on the list's length and recompile the
        block for every micro-batch, and the recompute test is untraceable. So a compiled forward only
        stores its statistics (an attribute store: no guard), and the model's eager loop moves them into
        `stats` after the block returns (`take_pending_stats`); a recompute runs inside backward, never
        in that loop, so it only overwrites `pending_stats` with the same values.
        """
        if torch.compiler.is_compiling():
            self.pending_stats = stats
        elif not recomputing():
            self.stats.append(stats)

    def take_pending_stats(self) -> None:
        """After this layer's block ran compiled: its forward's statistics join `stats`."""
        if self.pending_stats is not None:
            self.stats.append(self.pending_stats)
            self.pending_stats = None

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        out_TD = self.shared_experts(x_TD)
        if self.shared_expert_gate is not None:
            out_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * out_TD
        return out_TD

    def _stats(self, routing: Routing, result: MoEOutput) -> dict[str, torch.Tensor]:
        # A static dispatcher's overflow drops count as dropped, as the router's capacity drops do.
        kept_E = routing.kept_E if result.overflow_E is None else routing.kept_E - result.overflow_E
        return {
            "routed": routing.routed_E,
            "kept": kept_E,
            "mean_prob": routing.mean_prob_E,
            "entropy": routing.entropy,
            "aux_loss": routing.aux_loss.detach(),
            "seq_aux_loss": routing.seq_aux_loss.detach(),
            "z_loss": routing.z_loss.detach(),
            "received": result.received_E.detach(),
        }

    def drain_stats(self) -> list[dict[str, torch.Tensor]]:
        """Returns and clears the statistics recorded since the last call, which ends the step: global-batch
        balancing counts the next step from zero (every driver drains after each step)."""
        stats, self.stats, self.pending_stats = self.stats, [], None
        self.router.step_load.reset()
        return stats
