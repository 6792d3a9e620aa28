"""`moe.dispatch=static` in one process: the sync-free MoE layer (moe/static_dispatch.py).

With a bound nothing can overflow it computes what the dynamic path computes (outputs and every gradient,
within fp32 rounding of a different summation order); with a tight bound it keeps, per sequence and expert,
exactly the highest-weight assignments a hand-written loop keeps, and counts the rest as dropped; its
forward and backward read nothing on the host; it compiles with fullgraph=True (no graph break).
The multi-process cases (ep2, tp2·ep2) are in tests/multiproc/test_static_dispatch.py.

    .venv/bin/pytest -q tests/unit/test_static_dispatch.py
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from moeyard.job.compose import compose
from moeyard.job.layout import check_layout
from moeyard.moe.config import MoEConfig
from moeyard.moe.dispatcher import LocalDispatcher
from moeyard.moe.layer import MoELayer
from moeyard.moe.static_dispatch import StaticDispatcher
from moeyard.parallel.dims import ParallelDims
from tests.sync_counter import SyncCounter

E, K, D, F, G, S = 8, 2, 16, 8, 3, 10


def _layer(**moe) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=K, expert_hidden=F, **moe))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _x() -> torch.Tensor:
    return torch.randn(G, S, D, generator=torch.Generator().manual_seed(1))


def _run(layer: MoELayer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = _x().requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    return y, {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}


@pytest.mark.parametrize(
    "moe",
    [{}, {"capacity_factor": 1.0}, {"expert_biases": True, "num_shared_experts": 1}],
    ids=["dropless", "router-capacity", "biases-shared"],
)
def test_bound_that_never_overflows_computes_the_dynamic_path(moe):
    dynamic, static = _layer(**moe), _layer(**moe, dispatch="static")
    assert isinstance(static.dispatcher, StaticDispatcher)
    (y_dyn, g_dyn), (y_st, g_st) = _run(dynamic), _run(static)
    # fp32 rounding only (sums in another order); a misplaced or dropped row would move outputs by O(0.1).
    torch.testing.assert_close(y_st, y_dyn)
    for name, grad in g_dyn.items():
        torch.testing.assert_close(g_st[name], grad, msg=name)
    assert torch.equal(static.drain_stats()[0]["kept"], dynamic.drain_stats()[0]["kept"])


def _kept_by_hand(expert_A: torch.Tensor, weight_A: torch.Tensor, capacity: int) -> torch.Tensor:
    """Per sequence and expert, the `capacity` highest-weight assignments (earlier first on equal weights)."""
    keep, weight = torch.zeros_like(expert_A, dtype=torch.bool), weight_A.tolist()
    per_seq = S * K
    for g in range(G):
        for e in range(E):
            mine = [a for a in range(g * per_seq, (g + 1) * per_seq) if expert_A[a] == e]
            mine.sort(key=lambda a: (-weight[a], a))
            keep[mine[:capacity]] = True
    return keep


def test_tight_bound_keeps_the_highest_weights_of_each_sequence_and_counts_the_rest():
    factor = 0.5
    layer = _layer(dispatch="static", dispatch_capacity_factor=factor)
    capacity = math.ceil(factor * S * K / E)
    x_TD = _x().view(G * S, D)
    with torch.no_grad():
        routing = layer.router(x_TD.view(G, S, D))
    keep_A = _kept_by_hand(routing.expert_idx_A, routing.weight_A, capacity)
    assert int((~keep_A).sum()) > 0, "the bound must drop something for this test to mean anything"
    bounded = replace(routing, expert_idx_A=torch.where(keep_A, routing.expert_idx_A, E), num_kept=None)

    got = layer.dispatcher.run(x_TD, routing, layer.experts, None, seq_len=S)
    want = LocalDispatcher(E).run(x_TD, bounded, layer.experts, None)
    torch.testing.assert_close(got.out_TD, want.out_TD)
    dropped_E = torch.bincount(routing.expert_idx_A[~keep_A], minlength=E)
    assert torch.equal(got.overflow_E, dropped_E)
    assert torch.equal(got.received_E, want.received_E)

    layer(x_TD.view(G, S, D))
    stats = layer.drain_stats()[-1]
    assert torch.equal(stats["routed"] - stats["kept"], dropped_E), "overflow must count as dropped"


@pytest.mark.parametrize("factor", [None, 0.5])
def test_forward_and_backward_read_nothing_on_the_host(factor):
    layer = _layer(dispatch="static", dispatch_capacity_factor=factor, capacity_factor=1.0)
    with SyncCounter() as syncs:
        layer(_x().requires_grad_()).square().sum().backward()
    assert syncs.calls == []
    dynamic = _layer(capacity_factor=1.0)
    with SyncCounter() as syncs:
        dynamic(_x())
    assert len(syncs.calls) >= 1, "the counter must see the dynamic path's read"


def test_compiles_whole():
    layer = _layer(dispatch="static", dispatch_capacity_factor=0.5)
    eager_y, eager_g = _run(layer)
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    x = _x().requires_grad_()
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(x.grad, eager_g["x"])


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        ({"dispatch_capacity_factor": 1.0}, "moe.dispatch_capacity_factor=1.0 needs moe.dispatch=static"),
        ({"dispatch": "static", "dispatch_capacity_factor": 0.0}, "moe.dispatch_capacity_factor=0.0 must be > 0"),
        ({"dispatch": "static", "router": "expert_choice"}, "moe.dispatch=static is token-choice only"),
        ({"dispatch": "sync-free"}, "moe.dispatch=sync-free must be one of dynamic, static"),
    ],
)
def test_bad_dispatch_settings_are_refused(moe, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**moe).check()


def test_overlap_modes_are_refused_with_static_dispatch():
    overrides = ["moe.dispatch=static", "parallel.ep=2", "parallel.dp=2", "parallel.ep_overlap=chunked"]
    cfg = compose(overrides)
    with pytest.raises(ValueError, match="parallel.ep_overlap=chunked needs moe.dispatch=dynamic"):
        check_layout(cfg, ParallelDims.from_config(cfg.parallel, 2))
    check_layout(compose(overrides[:-1]), ParallelDims.from_config(cfg.parallel, 2))
