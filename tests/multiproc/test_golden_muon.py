"""optim=muon trains every layout exactly like one process, and its momentum checkpoints and reshards.

Golden cases (test_golden.py's contract: losses, gathered parameters, layout in place), each against the
one-process Muon run of its config, plus every Muon momentum buffer gathered against the reference's:
dp2 FSDP (2-D weights gathered over dp for Newton-Schulz), dp2 FSDP with one expert (its rows split over edp,
moved whole to one rank, which alone orthogonalises it: asserted), tp2 (gathered over tp), ep2 (experts whole
on their ep rank, orthogonalised there), ep2 + FSDP (experts split along the expert dim: local), pp2, and
tp2 * pp2 * ep2 with FSDP over dp2 (8 ranks: FSDP over a tensor-parallel dim places a _StridedShard, gathered
over both). The 2-rank cases share one spawned group, one Trainer after another.

Momentum through DCP: the ep2 + FSDP run saves at step 3; tp2 (2 ranks, in the same group)
resumes from it and must train steps 4-5 as the saving run did. Restarting Muon's momentum from zero changes
the direction Newton-Schulz normalises, so a lost or misplaced buffer moves every Muon weight by about one
update.

    .venv/bin/pytest -q tests/multiproc/test_golden_muon.py    # ~105 s of CPU (2 + 8 ranks, 2 spawns)
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from moeyard.job.compose import compose
from moeyard.parallel import muon
from moeyard.parallel.muon import newton_schulz, takes_muon
from moeyard.parallel.state import full_optimizer_state, full_state_dict
from tests.helpers import free_port, layout_facts, local_rank_env, make_trainer, spawn
from tests.multiproc import test_golden as golden

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(600)]

MUON = ["optim=muon"]
ONE_EXPERT = [*MUON, "moe.num_experts=1", "moe.top_k=1"]  # fewer experts than edp ranks: FSDP splits rows
SAVES = ("checkpoint.enabled=true", "checkpoint.every=3")
CASES = {  # id -> (world, layout overrides, variant shared with the reference)
    c[0]: c[1:]
    for c in [
        golden.case(replace(golden.DP2, dp_mode="fsdp"), MUON),
        golden.case(replace(golden.DP2, dp_mode="fsdp"), ONE_EXPERT, "one-expert"),
        golden.case(golden.TP2, MUON),
        golden.case(golden.EP2, MUON),
        golden.case(replace(golden.EP2, dp_mode="fsdp"), MUON, "saves", SAVES),
        golden.case(golden.PP2, MUON),
        golden.case(replace(golden.TP2, pp=2, ep=2, dp=2, dp_mode="fsdp"), MUON),
    ]
}
SOURCE = next(case_id for case_id in CASES if case_id.endswith("-saves"))
RESUMED_TP2 = ["parallel.tp=2"]
"""Resumed from SOURCE's step 3 in the 2-rank group: expert shards and FSDP DTensors become TP DTensors."""

_results: dict[str, dict] = {}


def _overrides(case_id: str, root: Path) -> list[str]:
    _, layout, variant = CASES[case_id]
    return [*golden.BASE, *variant, *layout, f"run.dir={root / case_id}"]


def _train(overrides: list[str], rank: int, world: int) -> dict:
    """One run in the open group; rank 0's result (helpers._rank's keys, each rank's layout facts also
    listing how many expert matrices each of its batched Newton-Schulz calls took), else {}."""
    trainer = make_trainer(compose(overrides))
    initial = full_state_dict(trainer.pm)
    expert_batches = []

    def recording(u, steps, dtype):
        if u.ndim == 3:
            expert_batches.append(u.size(0))
        return newton_schulz(u, steps, dtype)

    with mock.patch.object(muon, "newton_schulz", recording):
        history = trainer.fit()
    result = {"history": history, "state": full_state_dict(trainer.pm), "initial": initial}
    result["optim"] = full_optimizer_state(trainer.pm, trainer.optimizer)
    facts = [None] * world
    dist.all_gather_object(facts, {**layout_facts(trainer), "ns_expert_batches": expert_batches})
    return {**result, "layout": facts} if rank == 0 else {}


def _rank_cases(rank: int, world: int, port: int, runs: list[tuple[str, list[str]]], out: str) -> None:
    """Trains each (id, overrides) of `runs` in turn in one gloo group; rank 0 saves {id: result}."""
    local_rank_env(rank, world, port)
    results = {}
    for case_id, overrides in runs:
        results[case_id] = _train(overrides, rank, world)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def results(world: int, root: Path) -> dict[str, dict]:
    """Every case of `world` ranks, run in one spawned group (and, for 2 ranks, the tp2 resume), once."""
    if world not in {r.get("world") for r in _results.values()}:
        runs = [(cid, _overrides(cid, root)) for cid, c in CASES.items() if c[0] == world]
        if world == 2:
            resume = f"train.resume={root / SOURCE / 'checkpoints' / 'step_3'}"
            runs.append(("resumed-tp2", [*golden.BASE, *MUON, *RESUMED_TP2, f"run.dir={root / 'resumed'}", resume]))
        out = root / f"world{world}.pt"
        spawn(_rank_cases, (world, free_port(), runs, str(out)), world)
        for case_id, result in torch.load(out, weights_only=True).items():
            _results[case_id] = {**result, "world": world}
    return _results


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("muon")


def assert_same_momentum(got: dict, ref: dict) -> None:
    """Every Muon momentum buffer, gathered, against the reference's. A missed, repeated or misplaced update
    moves a buffer by (1 - momentum) = 5% of its norm or more; fp32 rounding of the layouts' gradient sums
    stays near 1e-6 of it. 1e-3 of its norm lies between."""
    buffers = {k: v for k, v in ref["optim"].items() if k.endswith(".momentum_buffer")}
    assert buffers, "the reference holds no Muon momentum"
    for key, want in buffers.items():
        name = key.removesuffix(".momentum_buffer")
        assert takes_muon(name, want.ndim), key
        err = float((got["optim"][key] - want).norm() / want.norm())
        assert err <= 1e-3, f"{key}: |got - ref| is {err:.3g} of its norm"
    adam = {k for k in got["optim"] if k.endswith(".exp_avg")}
    assert {k.removesuffix(".exp_avg") for k in adam}.isdisjoint(k.removesuffix(".momentum_buffer") for k in buffers)


@pytest.mark.parametrize("case_id", list(CASES))
def test_muon_layout_trains_like_one_process(case_id, root, tmp_path_factory):
    world, _, variant = CASES[case_id]
    ref = golden.reference(variant, tmp_path_factory)
    got = results(world, root)[case_id]
    if variant == ONE_EXPERT:  # golden's layout rules expect every dim to split evenly; the [1, D] router does not
        for facts in got["layout"]:
            experts = {n: f for n, f in facts["params"].items() if ".experts." in n}
            assert experts and all(f[1:3] == (("S(1)",), ("edp",)) for f in experts.values()), experts
        # The one expert is orthogonalised whole on rank 0 only (moved there by an all-to-all), never repeated.
        batches = [facts["ns_expert_batches"] for facts in got["layout"]]
        assert set(batches[0]) == {1} and set(batches[1]) == {0}, batches
    else:
        golden.assert_layout_applied(_overrides(case_id, root), world, got)
    golden.assert_same_training(ref, got)
    assert_same_momentum(got, ref)


def _assert_resumed_like_source(got: dict, src: dict) -> None:
    """Steps 4-5 after a resume from step 3 are the saving run's: losses, parameters, Muon momentum."""
    assert [h["step"] for h in got["history"]] == [4, 5]
    got_losses, src_losses = [h["loss"] for h in got["history"]], [h["loss"] for h in src["history"][3:]]
    assert got_losses == pytest.approx(src_losses, rel=golden.EXACT.loss_rtol)
    for name, want in src["state"].items():
        torch.testing.assert_close(got["state"][name], want, rtol=1e-4, atol=golden.EXACT.param_atol, msg=name)
    assert_same_momentum(got, src)


def test_momentum_reshards_to_tp2(root):
    res = results(2, root)
    _assert_resumed_like_source(res["resumed-tp2"], res[SOURCE])
