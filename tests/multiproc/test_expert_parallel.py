"""The all-to-all expert-parallel dispatcher equals the local one, including a rank that receives no tokens.

Two gloo ranks each hold half the experts and half the sequences; outputs, input gradients and expert/router
gradients must match one process holding everything. A selection bias steers every token to rank 0's experts,
so rank 1 receives nothing yet must take part in both all-to-alls and return zero expert gradients.
The overlap modes (shared experts during the dispatch; the tokens cut into chunks whose all-to-alls
interleave with the expert matmuls) compute the same rows: they match one process too. Every mode reads
the host once per layer (the row counts of its all-to-alls).

    .venv/bin/pytest -q tests/multiproc/test_expert_parallel.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moeyard.moe.config import MoEConfig
from moeyard.moe.experts import GroupedExperts
from moeyard.moe.layer import MoELayer
from moeyard.parallel.expert import AllToAllDispatcher
from tests.helpers import free_port, spawn
from tests.sync_counter import SyncCounter

E, D, F, EP = 8, 16, 8, 2


def _layer(cfg: MoEConfig, seed: int) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _worker(rank: int, port: int, cfg: MoEConfig, starve_rank1: bool, overlap: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(EP), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    ref = _layer(cfg, seed=0)
    if starve_rank1:
        ref.router.expert_bias[: E // EP] = 100.0  # selection only: weights still come from the scores
    x = torch.randn(4, 6, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad_out = torch.randn(4, 6, D, generator=torch.Generator().manual_seed(2))
    ref(x).backward(grad_out)

    ep = _layer(cfg, seed=0)
    ep.router.expert_bias.copy_(ref.router.expert_bias)
    ep.experts = GroupedExperts(E // EP, D, F)
    for name in ("w1", "w2", "w3"):
        getattr(ep.experts, name).data.copy_(getattr(ref.experts, name).data.chunk(EP)[rank])
    ep.dispatcher = AllToAllDispatcher(E, dist.group.WORLD, dist.group.WORLD, overlap=overlap, chunks=3)
    rows = slice(2 * rank, 2 * rank + 2)
    x_local = x.detach()[rows].clone().requires_grad_()
    with SyncCounter() as syncs:
        y_local = ep(x_local)
    y_local.backward(grad_out[rows])
    router_grad = ep.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)
    result = {
        "out": (y_local - ref(x.detach())[rows]).abs().max().item(),
        "x_grad": (x_local.grad - x.grad[rows]).abs().max().item(),
        "w1_grad": (ep.experts.w1.grad - ref.experts.w1.grad.chunk(EP)[rank]).abs().max().item(),
        "router_grad": (router_grad - ref.router.gate.weight.grad).abs().max().item(),
        "received": int(ep.drain_stats()[0]["received"].sum()),
        "syncs": syncs.calls,
    }
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("capacity_factor", "starve_rank1", "shared", "overlap"),
    [(None, True, 0, "none"), (1.0, False, 1, "none"), (1.0, False, 1, "shared"), (None, True, 1, "chunked")],
    ids=["dropless-rank1-gets-nothing", "capacity-shared", "capacity-shared-overlap", "chunked-rank1-starved"],
)
def test_all_to_all_matches_local(capacity_factor, starve_rank1, shared, overlap, tmp_path):
    # Balancing losses off: they are per-rank means (the trainer averages them over ranks), while this test
    # sums router gradients over ranks. tests/test_golden.py covers them in training.
    cfg = MoEConfig(
        num_experts=E,
        top_k=2,
        expert_hidden=F,
        capacity_factor=capacity_factor,
        num_shared_experts=shared,
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
    )
    out = str(tmp_path / "r")
    spawn(_worker, (free_port(), cfg, starve_rank1, overlap, out), EP)
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(EP)]
    for r in results:
        # One host read per layer: every chunk's all-to-all row counts, read together.
        assert len(r["syncs"]) == 1 and r["syncs"][0][0] == "Tensor.tolist", r["syncs"]
        assert r["out"] < 1e-5 and r["x_grad"] < 1e-5, r
        assert r["w1_grad"] < 1e-5 and r["router_grad"] < 1e-5, r
    if starve_rank1:
        assert results[1]["received"] == 0 and results[0]["received"] > 0
    else:
        assert all(r["received"] > 0 for r in results)
