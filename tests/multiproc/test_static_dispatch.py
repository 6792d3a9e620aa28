"""`moe.dispatch=static` across ranks: sync-free, whole-graph, and the golden contract (one spawned group).

Four gloo ranks share one spawn. First the MoE layer alone, on two pairs of ranks at once, each pair an ep
group holding half the experts per rank: ep2 (ranks 0, 1: one sequence each) and tp2·ep2 (ranks 2, 3: each
routes half of every sequence, the ep group being the tp pair). With a tight bound, its eager forward and
backward read nothing on the host (the sync counter), and `torch.compile(fullgraph=True)` (a graph break
raises) traces it; both compute what one process with the same bound computes on the whole batch: outputs,
input, expert and router gradients. Then the trainer on tp2·ep2·dp2: with a bound that never overflows it
trains like one process on the dynamic path; with a tight bound it drops exactly what one process with the
same bound drops (`dropped_frac` > 0) and trains like it.

    .venv/bin/pytest -q tests/multiproc/test_static_dispatch.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from moeyard.job.compose import compose
from moeyard.moe.config import MoEConfig
from moeyard.moe.experts import GroupedExperts
from moeyard.moe.layer import MoELayer
from moeyard.parallel.expert import TensorParallelSplit
from moeyard.parallel.state import full_state_dict
from moeyard.parallel.static_a2a import StaticAllToAllDispatcher
from tests.helpers import free_port, layout_facts, local_rank_env, make_trainer, spawn
from tests.multiproc import test_golden as golden
from tests.sync_counter import SyncCounter

WORLD, E, D, F, B, S = 4, 8, 16, 8, 2, 8
# Balancing terms off: they are per-rank means (the trainer averages them), while the layer cases sum router
# gradients over ranks. The trainer cases keep them.
LAYER_CFG = dict(num_experts=E, top_k=2, expert_hidden=F, aux_loss_coef=0.0, z_loss_coef=0.0)
TIGHT = 0.5
"""dispatch_capacity_factor: 1 slot per expert per sequence of 8 tokens (mean load 2): it drops."""
LAYOUT = replace(golden.TP2, ep=2, dp=2).overrides()
STATIC = ["moe.dispatch=static"]
STATIC_TIGHT = [*STATIC, "moe.dispatch_capacity_factor=0.5"]


def _layer(seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, MoEConfig(**LAYER_CFG, dispatch="static", dispatch_capacity_factor=TIGHT))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def _layer_case(rank: int) -> dict:
    """One MoE layer on a pair of ranks, the ep group, each holding half the experts: ranks 0 and 1 (ep2) each
    hold one of the two sequences, ranks 2 and 3 (tp2·ep2) each hold half of both. One compile per rank."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair, index, tp = pairs[rank // 2], rank % 2, 1 + rank // 2
    x_BSD = torch.randn(B, S, D, generator=torch.Generator().manual_seed(1))
    grad_BSD = torch.randn(B, S, D, generator=torch.Generator().manual_seed(2))
    ref = _layer()
    x_ref = x_BSD.clone().requires_grad_()
    ref(x_ref).backward(grad_BSD)
    ref_stats = ref.drain_stats()[0]
    rows = (slice(None), slice(index * S // 2, (index + 1) * S // 2)) if tp == 2 else (slice(index, index + 1),)

    def sharded() -> MoELayer:
        layer = _layer()
        layer.experts = GroupedExperts(E // 2, D, F)
        for name in ("w1", "w2", "w3"):
            getattr(layer.experts, name).data.copy_(getattr(ref.experts, name).data.chunk(2)[index])
        split = TensorParallelSplit(pair) if tp == 2 else None
        layer.dispatcher = StaticAllToAllDispatcher(layer.cfg, pair, pair, split)
        return layer

    result = {"dropped": int((ref_stats["routed"] - ref_stats["kept"]).sum())}
    for mode in ("eager", "compiled"):
        layer = sharded()
        x = x_BSD[rows].clone().requires_grad_()
        if mode == "eager":
            with SyncCounter() as counter:
                y = layer(x)
                y.backward(grad_BSD[rows])
            syncs = counter.calls
        else:  # aot_eager: dynamo's whole-graph trace and AOT autograd's, without inductor's code generation
            y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
            y.backward(grad_BSD[rows])
            syncs = []
        router_grad = layer.router.gate.weight.grad.clone()
        dist.all_reduce(router_grad, group=pair)
        result[mode] = {
            "out": (y - ref(x_BSD)[rows]).abs().max().item(),
            "x_grad": (x.grad - x_ref.grad[rows]).abs().max().item(),
            "w1_grad": (layer.experts.w1.grad - ref.experts.w1.grad.chunk(2)[index]).abs().max().item(),
            "router_grad": (router_grad - ref.router.gate.weight.grad).abs().max().item(),
            "syncs": syncs,
        }
    return result


def _train(rank: int, overrides: list[str]) -> dict | None:
    """`helpers._rank`'s run, in the process group already started: rank 0's history, states and facts."""
    trainer = make_trainer(compose(["train.log_every=1", *overrides]))
    initial = full_state_dict(trainer.pm)
    history = trainer.fit()
    state = full_state_dict(trainer.pm)
    facts = [None] * WORLD
    dist.all_gather_object(facts, layout_facts(trainer))
    return {"history": history, "state": state, "initial": initial, "layout": facts} if rank == 0 else None


def _rank_all(rank: int, world: int, port: int, runs: dict[str, list[str]], out: str) -> None:
    local_rank_env(rank, world, port)
    dist.init_process_group("gloo")  # the trainers below find it started and reuse it
    layer = [None] * world
    dist.all_gather_object(layer, _layer_case(rank))
    result = {"layer": layer}
    for name, overrides in runs.items():
        result[name] = _train(rank, [*overrides, f"run.dir={out}.{name}"])
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("static") / "result.pt")
    runs = {
        "never-overflows": [*golden.BASE, *STATIC, *LAYOUT],
        "tight": [*golden.BASE, *STATIC_TIGHT, *LAYOUT],
    }
    spawn(_rank_all, (WORLD, free_port(), runs, out), WORLD)
    return torch.load(out, weights_only=True)


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("rank", range(WORLD), ids=["ep2-rank0", "ep2-rank1", "tp2-ep2-rank0", "tp2-ep2-rank1"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_layer_reads_nothing_compiles_whole_and_drops_as_one_process(results, rank, mode):
    got = results["layer"][rank][mode]
    assert results["layer"][rank]["dropped"] > 0, "the bound must drop for the comparison to mean anything"
    assert got["syncs"] == [], f"host reads in the static MoE layer: {got['syncs']}"
    # fp32 rounding of sums in another order; a row dropped or sent to the wrong expert moves them by O(0.1).
    for key in ("out", "x_grad", "w1_grad", "router_grad"):
        assert got[key] < 1e-5, f"{key} differs from one process with the same bound by {got[key]:.3g}"


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("run", "variant"), [("never-overflows", []), ("tight", STATIC_TIGHT)], ids=["never-overflows", "tight"]
)
def test_trains_like_one_process(results, run, variant, tmp_path_factory):
    """never-overflows: against one process on the dynamic path; tight: one process with the same bound."""
    got = results[run]
    golden.assert_same_training(golden.reference(variant, tmp_path_factory), got)
    dynamic = golden.expected_layout([*golden.BASE, *LAYOUT], WORLD, 0)["dispatch"]
    for facts in got["layout"]:  # the static dispatcher in every MoE block; the rest as the dynamic path's
        assert set(facts["dispatch"].values()) == {("StaticAllToAllDispatcher", "-", 1)}
        facts["dispatch"] = dynamic
    golden.assert_layout_applied([*golden.BASE, *LAYOUT], WORLD, got)
    dropped = [h["dropped_frac"] for h in got["history"]]
    assert all(d > 0 for d in dropped) if run == "tight" else all(d == 0 for d in dropped), dropped
