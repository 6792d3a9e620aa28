"""Router decisions that fp32 rounding can turn: what the golden tests allow a layout beyond rounding.

A layout computes every router score from differently ordered sums (tensor-parallel partial sums, another
GEMM blocking, another CPU's vector width), so its scores differ from one process's by rounding. A discrete
decision drawn from scores -- a token's top-k experts, which assignments fit an expert's capacity (the
`probability` policy), which tokens an expert picks (expert choice) -- agrees with one process's unless the
reference's own scores at the decision's edge lie within that rounding of each other. `record_near_ties`
counts such decisions while the single-process reference trains; the golden tolerances are derived from that
count (tests/multiproc/test_golden.py, `tolerance`), so they follow the data and the config on each machine
rather than a constant measured on one. The `position` policy's capacity decisions use positions only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moeyard.moe import router as router_module

FP32_UNIT_ROUNDOFF = 2.0**-24


def rounding_margin(cfg) -> float:
    """Relative amount by which one router score of a layout and of the reference may differ.

    Each block on a router's path ends in sums of at most n = max(dim, ffn_hidden, expert_hidden, seq_len)
    fp32 terms (projections, attention over the sequence). Summed in another order, such a sum moves by
    about sqrt(n) * u relative (u = 2^-24; rounding errors of mixed signs add like a random walk, Higham,
    "Accuracy and Stability of Numerical Algorithms", sec. 2.8), and the errors of the n_layers blocks add.
    Layout and reference each carry that error, so they differ by up to twice it: 5.4e-6 for the debug model.
    """
    m, moe = cfg.model, cfg.moe
    n = max(m.dim, m.ffn_hidden, moe.expert_hidden, cfg.train.seq_len)
    return 2 * m.n_layers * math.sqrt(n) * FP32_UNIT_ROUNDOFF


def _near_edge(sorted_desc: torch.Tensor, kept: int, margin: float) -> int:
    """How many of the `kept` best of each row of `sorted_desc` [..., N] (descending) lie within rounding of
    the best one left out: each could swap places with it when both move by `margin` (relative) in opposite
    directions. Rows with no entry left out (-inf) have no edge."""
    if kept >= sorted_desc.shape[-1]:
        return 0
    best_out = sorted_desc[..., kept : kept + 1]
    inside = sorted_desc[..., :kept]
    near = (inside - best_out <= 2 * margin * inside.abs()) & best_out.isfinite()
    return int(near.sum())


class NearTieCounter:
    """Counts, per router forward of the reference, the decisions within `margin` of going the other way."""

    def __init__(self, margin: float) -> None:
        self.margin = margin
        self.ties: list[int] = []
        """Near ties of each router forward, in order."""
        self.assignments: list[int] = []
        """Candidate assignments of each router forward."""

    def per_step(self, steps: int) -> tuple[list[int], int]:
        """(near ties made in each training step, assignments routed per step), for a run whose every step
        ran the same forwards (one per MoE layer and micro-batch)."""
        per = len(self.ties) // steps
        assert per * steps == len(self.ties), (len(self.ties), steps)
        return [sum(self.ties[s * per : (s + 1) * per]) for s in range(steps)], sum(self.assignments) // steps

    def observe(self, router: router_module.Router, x_GSD: torch.Tensor) -> None:
        """Counts one router forward on `x_GSD` [G, S, D]."""
        ties, assignments = self._count(router, x_GSD)
        self.ties.append(ties)
        self.assignments.append(assignments)

    @torch.no_grad()
    def _count(self, router: router_module.Router, x_GSD: torch.Tensor) -> tuple[int, int]:
        """Recomputes the router's scores from its input exactly as `Router.forward` does; returns (near
        ties, candidate assignments)."""
        cfg, m = router.cfg, self.margin
        G, S, _ = x_GSD.shape
        E, K = cfg.num_experts, cfg.top_k
        logits_TE = F.linear(x_GSD.reshape(G * S, -1).float(), router.gate.weight.float())
        if cfg.router == "expert_choice":
            probs_GES = torch.softmax(logits_TE, dim=-1).view(G, S, E).transpose(1, 2)
            C = min(S, router_module.capacity_per_sequence(cfg, S, factor=cfg.capacity_factor or 1.0))
            return _near_edge(probs_GES.sort(-1, descending=True).values, C, m), G * E * C
        ties = 0
        scores_TE = router._scores(logits_TE)
        choice_TE = scores_TE + router.expert_bias
        if cfg.n_groups > 1:  # which groups a token may use is a top-k of group scores too (`_select`)
            grouped = choice_TE.view(G * S, cfg.n_groups, E // cfg.n_groups)
            group_score = grouped.topk(min(2, E // cfg.n_groups), dim=-1).values.sum(-1)
            group_rank = group_score.sort(-1, descending=True)
            ties += _near_edge(group_rank.values, cfg.topk_groups, m)
            left_out = group_rank.indices[:, cfg.topk_groups :]
            grouped = grouped.scatter(1, left_out[..., None].expand(-1, -1, grouped.shape[-1]), float("-inf"))
            choice_TE = grouped.view(G * S, E)
        ties += _near_edge(choice_TE.sort(-1, descending=True).values, K, m)
        if cfg.capacity_factor is None or cfg.drop_policy != "probability":
            return ties, G * S * K
        topk_idx_TK = router._select(scores_TE)
        weight_TK = scores_TE.gather(1, topk_idx_TK)
        if cfg.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        expert_GN, weight_GN = topk_idx_TK.view(G, S * K), weight_TK.view(G, S * K)
        mine_GEN = expert_GN[:, None, :] == torch.arange(E)[None, :, None]
        by_expert_GEN = torch.where(mine_GEN, weight_GN[:, None, :], float("-inf"))
        C = router_module.capacity_per_sequence(cfg, S)
        return ties + _near_edge(by_expert_GEN.sort(-1, descending=True).values, C, m), G * S * K


def record_near_ties(counter: NearTieCounter) -> None:
    """Makes every `Router.forward` of this process report its input to `counter` first (in a spawned
    reference rank only; the routing itself is unchanged)."""
    forward = router_module.Router.forward

    def observed(self, x_GSD, reduce_load=None, split=None):
        counter.observe(self, x_GSD)
        return forward(self, x_GSD, reduce_load, split)

    router_module.Router.forward = observed
