"""Routers: token-choice top-k (softmax or sigmoid scores), expert-choice, capacity and balancing losses.

Shape legend: G sequences ("groups"), S tokens per sequence, T = G*S tokens, D model dim, E experts,
K experts per token, A candidate (token, expert) assignments (kept ones and those capacity dropped).

The router never synchronises with the host: no `bincount` (it reads the maximum on CUDA), no boolean-mask
gathers (their output size is data-dependent), no `.item()`. Assignments that capacity drops stay in the
Routing with the sentinel expert id E, so every tensor has a size known from the shapes alone; the
dispatcher sorts them last and leaves them out once it knows the kept count.

Capacity is counted per sequence (GShard's "group"), so which assignments are dropped never depends on how
a batch is split over data-parallel ranks or micro-batches: a sharded run drops exactly what one process does.
When tensor-parallel ranks share an MoE layer's work, each routes a slice of every sequence; a
`SequenceSplit` (supplied by `parallel/`) lets the router make the capacity decision on whole sequences from
the slices' small top-k decisions, so it still drops exactly what one process does. Its balancing terms are
then local estimates whose mean over the slices is the whole sequence's value. The Switch loss's f_e covers
the micro-batch, each sequence, or the step's micro-batches so far (`moe.balance_scope`, moe/balance.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moeyard.moe.balance import LoadReducer, StepLoad
from moeyard.moe.config import MoEConfig


class SequenceSplit(Protocol):
    """Every sequence is split into `parts` equal slices along S, one per rank; this rank holds `index`."""

    parts: int
    index: int
    summed: int
    """Of the `parts` ranks, how many sum their router gradients (tensor-parallel ranks; context-parallel ranks
    average theirs with the data-parallel mean instead)."""

    def gather(self, t_GS: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's slice along dim 1, in order (no gradient): [G, S/parts, ...] -> [G, S, ...]."""
        ...

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sums `t` over the ranks holding the slices (no gradient)."""
        ...


def count_per_expert(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert (int64 [E]); ids >= E (dropped) are not counted.

    A scatter-add into E + 1 bins rather than `bincount`, which on CUDA synchronises to size its output.
    """
    flat = expert_idx.flatten().clamp(max=num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_idx.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))[:num_experts]


@dataclass(frozen=True)
class Routing:
    """Router decisions for T tokens, consumed by the dispatcher and the expert-load tracker."""

    token_idx_A: torch.Tensor
    """Flat token index of each candidate assignment (int64)."""
    expert_idx_A: torch.Tensor
    """Expert of each candidate assignment (int64); E where capacity dropped it."""
    weight_A: torch.Tensor
    """Combine weight of each candidate assignment (float, differentiable)."""
    num_kept: int | None
    """Kept assignments when the shapes alone tell (dropless routing); None when only the device knows."""
    routed_E: torch.Tensor
    """Assignments chosen per expert before capacity (int64)."""
    kept_E: torch.Tensor
    """Assignments kept per expert after capacity (int64)."""
    mean_prob_E: torch.Tensor
    """Mean router probability per expert over the tokens (detached)."""
    entropy: torch.Tensor
    """Mean router entropy per token in nats (detached scalar)."""
    aux_loss: torch.Tensor
    """Switch/GShard balancing loss over the tokens moe.balance_scope says, unscaled (scalar; each of the three
    losses is differentiable where its coefficient is nonzero, else computed for the metrics alone)."""
    seq_aux_loss: torch.Tensor
    """Sequence-level balancing loss, unscaled (scalar)."""
    z_loss: torch.Tensor
    """Router z-loss, unscaled (scalar)."""
    per_token: int | None = None
    """K when the assignments are token-major, K per token (assignment a is token a // K's): token choice."""

    def kept(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token, expert, weight) of the kept assignments only: a boolean gather that synchronises, for
        tests and reference code, never for the training path."""
        mask = self.expert_idx_A < self.routed_E.numel()
        return self.token_idx_A[mask], self.expert_idx_A[mask], self.weight_A[mask]


def capacity_per_sequence(cfg: MoEConfig, seq_len: int, factor: float | None = None) -> int:
    """Slots per expert per sequence: ceil(factor * S * K / E)."""
    factor = cfg.capacity_factor if factor is None else factor
    return max(1, math.ceil(factor * seq_len * cfg.top_k / cfg.num_experts))


def capacity_keep_mask(
    expert_GN: torch.Tensor, priority_GN: torch.Tensor, num_experts: int, capacity: int
) -> torch.Tensor:
    """Which of the N assignments of each sequence fit into `capacity` slots per expert.

    Args:
        expert_GN: expert of each assignment, int64 [G, N].
        priority_GN: lower value = served first, any real dtype [G, N].
        num_experts: E.
        capacity: slots per expert per sequence.

    Returns:
        bool [G, N], True where the assignment is kept.
    """
    G, N = expert_GN.shape
    rank_GN = priority_GN.argsort(dim=-1, stable=True).argsort(dim=-1)
    order_GN = (expert_GN * N + rank_GN).argsort(dim=-1)
    sorted_expert_GN = expert_GN.gather(-1, order_GN)
    counts_GE = torch.zeros(G, num_experts, dtype=torch.long, device=expert_GN.device)
    counts_GE.scatter_add_(1, expert_GN, torch.ones_like(expert_GN))
    starts_GE = counts_GE.cumsum(-1) - counts_GE
    pos_sorted_GN = torch.arange(N, device=expert_GN.device) - starts_GE.gather(-1, sorted_expert_GN)
    keep_GN = torch.empty_like(expert_GN, dtype=torch.bool)
    keep_GN.scatter_(-1, order_GN, pos_sorted_GN < capacity)
    return keep_GN


def switch_aux_loss(probs_TE: torch.Tensor, routed_E: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balancing loss E * sum_e f_e * P_e.

    f_e (fraction of assignments routed to e) comes from `routed_E`, which the caller may have summed over
    data-parallel ranks (and, for global-batch balancing, over the step's earlier micro-batches); P_e is the
    local mean probability, over this rank's tokens only. Averaging this loss over ranks then equals the
    loss of the whole batch, so every layout trains like one process. (Dividing P_e by the tokens of every
    rank instead, as Megatron-Core's global_aux_loss did before NVIDIA/Megatron-LM#3769, makes the gradient
    1/dp too small.)
    """
    E = probs_TE.shape[-1]
    f_E = routed_E.to(probs_TE.dtype) / routed_E.sum().clamp(min=1)
    return E * (f_E * probs_TE.mean(0)).sum()


def sequence_aux_loss(
    probs_GSE: torch.Tensor, topk_idx_GSK: torch.Tensor, split: SequenceSplit | None = None
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balancing loss, averaged over sequences.

    Per sequence: sum_e f_e * P_e with f_e = E / (K*S) * (tokens choosing e), P_e = mean normalised score.
    With `split`, f_e counts the whole sequence and P_e is this slice's mean, so the mean of the result over
    the slices is the whole sequence's loss.
    """
    G, S, E = probs_GSE.shape
    K = topk_idx_GSK.shape[-1]
    counts_GE = torch.zeros(G, E, device=probs_GSE.device, dtype=probs_GSE.dtype)
    counts_GE.scatter_add_(
        1, topk_idx_GSK.reshape(G, -1), torch.ones_like(topk_idx_GSK.reshape(G, -1), dtype=probs_GSE.dtype)
    )
    if split is not None:
        counts_GE, S = split.sum(counts_GE), S * split.parts
    f_GE = counts_GE * E / (K * S)
    p_GE = (probs_GSE / probs_GSE.sum(-1, keepdim=True)).mean(1)
    return (f_GE * p_GE).sum(-1).mean()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class Router(nn.Module):
    """Scores tokens against experts and picks assignments (token-choice or expert-choice)."""

    def __init__(self, dim: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(dim, cfg.num_experts, bias=cfg.router_bias)
        # Aux-loss-free balancing: a bias that only steers selection, never the combine weights.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts), persistent=True)
        self.step_load = StepLoad()
        """balance_scope=global_batch: the step's routed counts so far (reset by `MoELayer.drain_stats`)."""

    def forward(
        self, x_GSD: torch.Tensor, reduce_load: LoadReducer | None = None, split: SequenceSplit | None = None
    ) -> Routing:
        """Route every token of `x_GSD` [G, S, D]; `reduce_load` sums per-expert counts over every rank holding
        tokens of the batch; `split` says `x_GSD` holds one slice of each sequence (S is then the slice's)."""
        G, S, _ = x_GSD.shape
        # Router math in fp32: small logit differences decide discrete choices (ST-MoE, sec. 3). Autocast
        # would run the linear in bf16 whatever its inputs' dtype, so it is switched off here.
        with torch.autocast(x_GSD.device.type, enabled=False):
            bias = self.gate.bias.float() if self.gate.bias is not None else None
            logits_TE = F.linear(x_GSD.reshape(G * S, -1).float(), self.gate.weight.float(), bias)
        if self.cfg.router == "expert_choice":
            return self._expert_choice(logits_TE, G, S, split)
        return self._token_choice(logits_TE, G, S, reduce_load, split)

    def _scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        if self.cfg.router == "sigmoid_topk":
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)

    def _select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """Top-K expert indices per token [T, K], with the balancing bias and group limits applied."""
        cfg = self.cfg
        choice_TE = scores_TE.detach() + self.expert_bias
        if cfg.n_groups > 1:
            T, E = choice_TE.shape
            grouped_TGe = choice_TE.view(T, cfg.n_groups, E // cfg.n_groups)
            # DeepSeek-V3 scores a group by the sum of its two best experts.
            top2 = min(2, E // cfg.n_groups)
            group_score_TG = grouped_TGe.topk(top2, dim=-1).values.sum(-1)
            keep_groups_TG = group_score_TG.topk(cfg.topk_groups, dim=-1).indices
            group_mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, keep_groups_TG, True)
            choice_TE = grouped_TGe.masked_fill(~group_mask_TG[..., None], float("-inf")).view(T, E)
        return choice_TE.topk(cfg.top_k, dim=-1).indices

    def _token_choice(
        self, logits_TE: torch.Tensor, G: int, S: int, reduce_load: LoadReducer | None, split: SequenceSplit | None
    ) -> Routing:
        cfg = self.cfg
        E, K = cfg.num_experts, cfg.top_k
        scores_TE = self._scores(logits_TE)
        topk_idx_TK = self._select(scores_TE)
        weight_TK = scores_TE.gather(1, topk_idx_TK)
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        weight_TK = weight_TK * cfg.route_scale

        routed_E = count_per_expert(topk_idx_TK, E)
        expert_TK, num_kept = topk_idx_TK, G * S * K
        if cfg.capacity_factor is not None:
            keep_TK = self._capacity_mask(topk_idx_TK, weight_TK, G, S, split)
            expert_TK, num_kept = torch.where(keep_TK, topk_idx_TK, E), None
        counts_E = None if cfg.balance_scope == "sequence" else self._balance_counts(routed_E, reduce_load)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True) if cfg.router == "sigmoid_topk" else scores_TE
        seq_aux_coef = cfg.seq_aux_loss_coef + (cfg.aux_loss_coef if counts_E is None else 0.0)
        with _graph_if(seq_aux_coef):
            seq_aux = sequence_aux_loss(scores_TE.view(G, S, E), topk_idx_TK.view(G, S, K), split)
        with _graph_if(cfg.aux_loss_coef):
            aux = seq_aux if counts_E is None else switch_aux_loss(probs_TE, counts_E)

        token_TK = torch.arange(G * S, device=logits_TE.device)[:, None].expand(-1, K)
        return Routing(
            token_idx_A=token_TK.flatten(),
            expert_idx_A=expert_TK.flatten(),
            weight_A=weight_TK.flatten(),
            num_kept=num_kept,
            routed_E=routed_E,
            kept_E=count_per_expert(expert_TK, E),
            mean_prob_E=probs_TE.detach().mean(0),
            entropy=_entropy(probs_TE),
            aux_loss=aux,
            seq_aux_loss=seq_aux,
            z_loss=self._z_loss(logits_TE),
            per_token=K,
        )

    def _z_loss(self, logits_TE: torch.Tensor) -> torch.Tensor:
        with _graph_if(self.cfg.z_loss_coef):
            return z_loss(logits_TE)

    def _balance_counts(self, routed_E: torch.Tensor, reduce_load: LoadReducer | None) -> torch.Tensor:
        """The counts f_e comes from: this micro-batch's over every rank holding its tokens, or under
        balance_scope=global_batch the step's so far (a forward without gradient, as in evaluation or
        generation, trains nothing and keeps to its own micro-batch)."""
        if self.cfg.balance_scope == "global_batch" and torch.is_grad_enabled():
            return self.step_load.counts(routed_E, reduce_load)
        return reduce_load(routed_E) if reduce_load is not None else routed_E

    def _capacity_mask(
        self, topk_idx_TK: torch.Tensor, weight_TK: torch.Tensor, G: int, S: int, split: SequenceSplit | None
    ) -> torch.Tensor:
        """Which of this rank's assignments fit their expert's per-sequence capacity, decided on whole
        sequences (gathered from the slices when `split` is given)."""
        K = self.cfg.top_k
        parts, index = (split.parts, split.index) if split is not None else (1, 0)
        full_S = S * parts
        expert_GSK = topk_idx_TK.view(G, S, K)
        if self.cfg.drop_policy == "probability":
            priority_GSK = -weight_TK.detach().view(G, S, K)
        else:  # earlier tokens first; all first choices before any second choice (GShard)
            slot_K = torch.arange(K, device=topk_idx_TK.device)
            pos_S = torch.arange(S, device=topk_idx_TK.device) + index * S
            priority_GSK = (slot_K[None, :] * full_S + pos_S[:, None]).expand(G, S, K)
        if split is not None:
            expert_GSK, priority_GSK = split.gather(expert_GSK), split.gather(priority_GSK.contiguous())
        keep = capacity_keep_mask(
            expert_GSK.reshape(G, full_S * K),
            priority_GSK.reshape(G, full_S * K),
            self.cfg.num_experts,
            capacity_per_sequence(self.cfg, full_S),
        )
        return keep.view(G, full_S, K)[:, index * S : (index + 1) * S].reshape(G * S, K)

    def _expert_choice(self, logits_TE: torch.Tensor, G: int, S: int, split: SequenceSplit | None) -> Routing:
        """Each expert picks its top-C tokens of every sequence (Zhou et al., 2022), from whole sequences."""
        E = self.cfg.num_experts
        parts, index = (split.parts, split.index) if split is not None else (1, 0)
        full_S = S * parts
        probs_GSE = torch.softmax(logits_TE, dim=-1).view(G, S, E)
        full_GSE = split.gather(probs_GSE.detach()) if split is not None else probs_GSE.detach()
        capacity = min(full_S, capacity_per_sequence(self.cfg, full_S, factor=self.cfg.capacity_factor or 1.0))
        pos_GEC = full_GSE.transpose(1, 2).topk(capacity, dim=-1).indices - index * S
        # Picks outside this rank's slice stay as dropped candidates (expert E, weight 0): no boolean gather.
        mine_GEC = (pos_GEC >= 0) & (pos_GEC < S)
        pos_GEC = pos_GEC.clamp(0, S - 1)
        g_GEC = torch.arange(G, device=logits_TE.device)[:, None, None].expand_as(pos_GEC)
        e_GEC = torch.arange(E, device=logits_TE.device)[None, :, None].expand_as(pos_GEC)
        count_E = mine_GEC.sum((0, 2))
        zero = logits_TE.new_zeros(())
        probs_TE = probs_GSE.view(G * S, E)
        weight_GEC = probs_GSE[g_GEC, pos_GEC, e_GEC] * mine_GEC
        return Routing(
            token_idx_A=(g_GEC * S + pos_GEC).flatten(),
            expert_idx_A=torch.where(mine_GEC, e_GEC, E).flatten(),
            weight_A=(weight_GEC * self.cfg.route_scale).flatten(),
            num_kept=pos_GEC.numel() if split is None else None,
            routed_E=count_E,
            kept_E=count_E,
            mean_prob_E=probs_TE.detach().mean(0),
            entropy=_entropy(probs_TE),
            aux_loss=zero,
            seq_aux_loss=zero,
            z_loss=self._z_loss(logits_TE),
        )

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """DeepSeek-V3 aux-free rule: b_e += rate * sign(mean load - load_e), from a whole step's load.

        `ok`: a device scalar, 0 on a step whose update was skipped (the bias is left as it was)."""
        load = load_E.to(self.expert_bias.dtype)
        step_E = self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_bias += step_E if ok is None else step_E * ok


def _entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    p = probs_TE.detach()
    return -(p * p.clamp(min=1e-20).log()).sum(-1).mean()


def _graph_if(coef: float):
    """Records a loss term's graph only when its coefficient can give it a gradient. A term weighted by 0 is
    still computed, for the metrics, but its backward (passes over [T, E] every step) is skipped: 0.3-0.6 ms
    per layer and step for the sequence loss alone at the shapes of benchmarks/moe_layer.py (this CPU)."""
    return torch.set_grad_enabled(torch.is_grad_enabled() and coef != 0)
