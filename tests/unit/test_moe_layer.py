"""The MoE layer equals a naive per-token reference in outputs and gradients; the aux losses reach the router.

The reference recomputes everything from the layer's weights with plain Python loops: per token its scores,
its top-k (with groups and bias), capacity per sequence by sorting each expert's candidates, then each
chosen expert's SwiGLU as three plain matmuls, plus the shared experts (scaled by their sigmoid gate).
Run: `.venv/bin/pytest -q tests/unit/test_moe_layer.py`.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moeyard.moe.config import MoEConfig
from moeyard.moe.experts import GroupedExperts
from moeyard.moe.layer import MoELayer
from moeyard.parallel.tensor import is_tp_partial

G, S, D, F_HIDDEN = 2, 8, 16, 8  # D and F divisible by 8 so grouped_mm "on" is allowed


def token_choice_routes(cfg: MoEConfig, logits_TE: torch.Tensor, bias_E: torch.Tensor) -> list[list]:
    """Per token: the (slot, expert, weight) of its top-k, before capacity."""
    routes = []
    for logits in logits_TE:
        scores = torch.sigmoid(logits) if cfg.router == "sigmoid_topk" else torch.softmax(logits, -1)
        choice = (scores.detach() + bias_E).tolist()
        allowed = range(cfg.num_experts)
        if cfg.n_groups > 1:
            size = cfg.num_experts // cfg.n_groups
            groups = [list(range(g * size, (g + 1) * size)) for g in range(cfg.n_groups)]
            group_score = [sum(sorted((choice[e] for e in grp), reverse=True)[:2]) for grp in groups]
            best = sorted(range(cfg.n_groups), key=lambda g: -group_score[g])[: cfg.topk_groups]
            allowed = [e for g in best for e in groups[g]]
        chosen = sorted(allowed, key=lambda e: -choice[e])[: cfg.top_k]
        weights = [scores[e] for e in chosen]
        total = sum(weights) if cfg.norm_topk_prob else 1.0
        routes.append(
            [(k, e, cfg.route_scale * w / total) for k, (e, w) in enumerate(zip(chosen, weights, strict=True))]
        )
    return routes


def apply_capacity(cfg: MoEConfig, routes: list[list]) -> list[list]:
    """Keeps, per sequence and expert, the first C candidates by weight or by (slot, position)."""
    C = math.ceil(cfg.capacity_factor * S * cfg.top_k / cfg.num_experts)
    kept = [[] for _ in routes]
    for g in range(len(routes) // S):
        cands = [(t, k, e, w) for t in range(g * S, (g + 1) * S) for (k, e, w) in routes[t]]
        if cfg.drop_policy == "probability":
            cands.sort(key=lambda c: -c[3].item())
        else:
            cands.sort(key=lambda c: (c[1], c[0]))
        used = [0] * cfg.num_experts
        for t, _, e, w in cands:
            if used[e] < C:
                used[e] += 1
                kept[t].append((e, w))
    return kept


def expert_choice_routes(cfg: MoEConfig, logits_TE: torch.Tensor) -> list[list]:
    """Each expert takes its C highest-probability tokens of every sequence."""
    C = min(S, math.ceil((cfg.capacity_factor or 1.0) * S * cfg.top_k / cfg.num_experts))
    kept = [[] for _ in range(logits_TE.shape[0])]
    for g in range(logits_TE.shape[0] // S):
        probs = [torch.softmax(logits_TE[t], -1) for t in range(g * S, (g + 1) * S)]
        for e in range(cfg.num_experts):
            for i in sorted(range(S), key=lambda i: -probs[i][e].item())[:C]:
                kept[g * S + i].append((e, cfg.route_scale * probs[i][e]))
    return kept


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def reference(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    """The layer's output computed token by token from its weights."""
    cfg = layer.cfg
    x_TD = x_BSD.reshape(-1, D)
    logits_TE = x_TD @ layer.router.gate.weight.T
    if cfg.router == "expert_choice":
        kept = expert_choice_routes(cfg, logits_TE)
    else:
        routes = token_choice_routes(cfg, logits_TE, layer.router.expert_bias)
        kept = apply_capacity(cfg, routes) if cfg.capacity_factor else [[(e, w) for _, e, w in r] for r in routes]
    ex, sh = layer.experts, layer.shared_experts
    rows = []
    for t, x in enumerate(x_TD):
        y = sum(w * swiglu(x, ex.w1[e], ex.w3[e], ex.w2[e]) for e, w in kept[t]) if kept[t] else 0 * x
        if sh is not None:
            gate = torch.sigmoid(x @ layer.shared_expert_gate.weight[0]) if cfg.shared_expert_gate else 1.0
            y = y + gate * swiglu(x, sh.w1.weight.T, sh.w3.weight.T, sh.w2.weight.T)
        rows.append(y)
    return torch.stack(rows).view_as(x_BSD)


def make_layer(seed: int = 0, **kw) -> MoELayer:
    kw = {"num_experts": 8, "top_k": 2, "expert_hidden": F_HIDDEN, **kw}
    kw.update(aux_loss_coef=kw.get("aux_loss_coef", 0.0), z_loss_coef=kw.get("z_loss_coef", 0.0))
    torch.manual_seed(seed)
    layer = MoELayer(D, MoEConfig(**kw))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def grads(layer: MoELayer, x: torch.Tensor, fn, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of sum(fn(x) * probe) w.r.t. x and every parameter (probe avoids stride-0 gradients)."""
    x = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    out = fn(x)
    (out * probe).sum().backward()
    named = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return {"out": out.detach(), "x": x.grad.clone(), **named}


CASES = {
    "softmax_dropless": {"router": "softmax_topk"},
    "softmax_unnormalised": {"router": "softmax_topk", "norm_topk_prob": False, "route_scale": 1.5},
    "softmax_drop_probability": {"capacity_factor": 0.5, "drop_policy": "probability"},
    "softmax_drop_position": {"capacity_factor": 0.5, "drop_policy": "position"},
    "switch_top1_drop": {"top_k": 1, "norm_topk_prob": False, "capacity_factor": 0.7},
    "sigmoid_groups_bias": {
        "router": "sigmoid_topk", "n_groups": 4, "topk_groups": 2, "route_scale": 2.5, "expert_bias": True,
    },
    "sigmoid_groups_drop": {
        "router": "sigmoid_topk", "n_groups": 4, "topk_groups": 2, "capacity_factor": 0.6,
        "norm_topk_prob": False,
    },
    "expert_choice": {"router": "expert_choice", "capacity_factor": 1.0},
    "expert_choice_small": {"router": "expert_choice", "capacity_factor": 0.5, "route_scale": 2.0},
    "shared_experts": {"router": "softmax_topk", "num_shared_experts": 2, "capacity_factor": 0.75},
    "sigmoid_shared": {"router": "sigmoid_topk", "num_shared_experts": 1},
    "qwen2_gated_shared": {  # one shared expert of its own width, scaled per token by sigmoid(x . w)
        "num_shared_experts": 1, "shared_expert_hidden": 24, "shared_expert_gate": True, "norm_topk_prob": False,
    },
}  # fmt: skip


@pytest.mark.parametrize("grouped_mm", ["on", "off"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_matches_naive_reference(case, grouped_mm):
    kw = dict(CASES[case])
    with_bias = kw.pop("expert_bias", False)
    layer = make_layer(grouped_mm=grouped_mm, **kw)
    assert layer.experts.use_grouped_mm == (grouped_mm == "on")
    if with_bias:
        layer.router.expert_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(G, S, D, generator=torch.Generator().manual_seed(1))
    probe = torch.randn(G, S, D, generator=torch.Generator().manual_seed(2))
    got = grads(layer, x, layer, probe)
    stats = layer.drain_stats()[0]
    if kw.get("capacity_factor") and kw.get("router") != "expert_choice":
        assert stats["kept"].sum() < stats["routed"].sum(), "the dropping case must drop"
    want = grads(layer, x, lambda x: reference(layer, x), probe)
    assert set(got) == set(want)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    assert got["router.gate.weight"].abs().sum() > 0


@pytest.mark.parametrize(
    "coef_name, loss_name, router",
    [
        ("aux_loss_coef", "aux_loss", "softmax_topk"),
        ("seq_aux_loss_coef", "seq_aux_loss", "sigmoid_topk"),
        ("z_loss_coef", "z_loss", "softmax_topk"),
        ("z_loss_coef", "z_loss", "expert_choice"),
    ],
)
def test_balancing_loss_gradient_reaches_router(coef_name, loss_name, router):
    """grad(out . probe + coef * loss) - grad(out . probe) equals grad(coef * loss) computed directly."""
    coef = 1.0
    # A small probe keeps the output's share of the router gradient near the aux term's size, so the
    # difference of the two fp32 gradients (router math is fp32) is exact enough to compare.
    x = torch.randn(G, S, D, generator=torch.Generator().manual_seed(1))
    probe = 1e-3 * torch.randn(G, S, D, generator=torch.Generator().manual_seed(2))
    with_loss = make_layer(router=router, **{coef_name: coef})
    without = make_layer(router=router)
    g_with = grads(with_loss, x, with_loss, probe)["router.gate.weight"]
    g_without = grads(without, x, without, probe)["router.gate.weight"]
    with_loss.zero_grad(set_to_none=True)  # the same weights; a term weighted by 0 records no graph
    (coef * getattr(with_loss.router(x), loss_name)).backward()
    g_direct = with_loss.router.gate.weight.grad
    assert g_direct.abs().sum() > 1e-4
    torch.testing.assert_close(g_with - g_without, g_direct, rtol=1e-4, atol=1e-7)


def test_layer_records_detached_stats_per_forward():
    layer = make_layer(capacity_factor=0.5)
    x = torch.randn(G, S, D)
    layer(x)
    layer(x)
    stats = layer.drain_stats()
    assert len(stats) == 2 and layer.drain_stats() == []
    s = stats[0]
    assert s["routed"].sum() == G * S * 2 and s["kept"].sum() == s["received"].sum()
    assert all(not v.requires_grad for v in s.values())
    assert s["mean_prob"].sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize("grouped_mm", ["on", "off"])
def test_experts_with_empty_groups_and_no_tokens(grouped_mm):
    torch.manual_seed(0)
    experts = GroupedExperts(4, D, F_HIDDEN, grouped_mm=grouped_mm)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.5)
    counts = torch.tensor([0, 3, 0, 2])  # experts 0 and 2 receive nothing
    x = torch.randn(5, D, requires_grad=True)
    y = experts(x, counts)
    owner = [1, 1, 1, 3, 3]
    ref = torch.stack([swiglu(x[i], experts.w1[e], experts.w3[e], experts.w2[e]) for i, e in enumerate(owner)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    (y * torch.randn_like(y)).sum().backward()
    assert experts.w1.grad[[0, 2]].abs().sum() == 0 and experts.w1.grad[[1, 3]].abs().sum() > 0
    # A rank whose experts receive no token at all still produces (zero) gradients for every weight.
    experts.zero_grad(set_to_none=True)
    empty = experts(torch.zeros(0, D), torch.zeros(4, dtype=torch.long))
    assert empty.shape == (0, D)
    empty.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in experts.parameters())


def test_shared_expert_width_and_gate_defaults_keep_the_layer_as_it_was():
    """No gate and num_shared * expert_hidden wide unless asked; the gate is one [1, D] row, tp-partial."""
    plain = make_layer(num_shared_experts=2)
    assert plain.shared_expert_gate is None and plain.shared_experts.w1.weight.shape == (2 * F_HIDDEN, D)
    assert not any("gate" in name and "router" not in name for name, _ in plain.named_parameters())
    gated = make_layer(num_shared_experts=2, shared_expert_hidden=24, shared_expert_gate=True)
    assert gated.shared_experts.w1.weight.shape == (24, D) and gated.shared_expert_gate.weight.shape == (1, D)
    assert is_tp_partial("layers.1.moe.shared_expert_gate.weight")
    with pytest.raises(ValueError, match="moe.shared_expert_gate=True needs moe.num_shared_experts >= 1"):
        make_layer(shared_expert_gate=True)
    with pytest.raises(ValueError, match="moe.shared_expert_hidden=0 must be >= 1"):
        make_layer(num_shared_experts=1, shared_expert_hidden=0)


def test_loss_terms_weighted_by_zero_are_computed_without_a_graph():
    """A term with coefficient 0 is still computed (the metrics log it) but records no backward; with its
    coefficient set it is differentiable."""
    x = torch.randn(G, S, D, requires_grad=True)
    off = make_layer().router(x)
    on = make_layer(aux_loss_coef=0.01, seq_aux_loss_coef=1e-4, z_loss_coef=1e-3).router(x)
    for name in ("aux_loss", "seq_aux_loss", "z_loss"):
        assert not getattr(off, name).requires_grad and getattr(on, name).requires_grad, name
        torch.testing.assert_close(getattr(off, name), getattr(on, name).detach())
