"""Global-batch load balancing (`moe.balance_scope=global_batch`) keeps the golden contract in every layout family.

Micro-batch m's balancing loss takes f_e from the step's micro-batches 0..m over every dp x tp rank
(moe/balance.py). That definition depends only on which rows make up each micro-batch, so every layout must
train exactly like one process with 4 micro-batches: data (replicated and FSDP), tensor, expert and context
parallel, a 2-rank pipeline with two interleaved stages per rank (whose schedule runs micro-batch 0's backward
before micro-batch 3's forward), and activation checkpointing, full (recomputes inside that schedule) and
selective. The three bugs this
guards: a gradient 1/dp too small (NVIDIA/Megatron-LM#3672) fails the dp and ep cases; a loss that became a
micro-batch loss (modelscope/ms-swift#6787) is caught by the check that the step's logged balancing loss
differs from the micro-batch scope's; counts added again by activation-checkpoint recomputes (pytorch/torchtitan
PR #4772) fail both ac cases, and counts read when a backward runs instead of when its forward ran would fail
the interleaved pipeline's (pytorch/torchtitan#2061).

All 2-rank runs train one after another in ONE spawned gloo group; the one-process reference runs once.

    .venv/bin/pytest -q tests/multiproc/test_golden_balance.py   # ~1 min on 2 idle cores
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from moeyard.job.compose import compose
from moeyard.parallel.state import full_state_dict
from moeyard.plan.planner import Layout
from tests.helpers import free_port, layout_facts, local_rank_env, make_trainer, spawn
from tests.multiproc import test_golden as golden

M = 4
GLOBAL = ["moe.balance_scope=global_batch", f"train.micro_batches={M}", "train.steps=3"]
"""3 of BASE's 5 steps: the parameters still move by >= 100x EXACT's allowance, in half the time."""
DP2, TP2 = Layout(tp=1, pp=1, dp=2, ep=1, micro_batches=M), Layout(tp=2, pp=1, dp=1, ep=1, micro_batches=M)
EP2 = replace(DP2, ep=2)
PP2_V2 = Layout(tp=1, pp=2, dp=1, ep=1, micro_batches=M, schedule="interleaved_1f1b", vpp=2)
CP2 = Layout.single(cp=2, micro_batches=M)
LAYOUTS = [
    DP2,
    replace(DP2, dp_mode="fsdp"),
    TP2,
    EP2,
    CP2,
    PP2_V2,
    replace(PP2_V2, ac="full"),
    replace(EP2, ac="selective"),
]
"""Every family on 2 ranks (FSDP and context parallelism too: cp ranks count their own chunks of each row);
the debug model's 4 blocks give each of the 4 pipeline stages one."""
MICRO_STEP = [*golden.BASE, *GLOBAL, *DP2.overrides(), "moe.balance_scope=micro_batch", "train.steps=1"]
"""The first layout's first step with the micro-batch loss, trained in the same group."""


def _rank_layouts(rank: int, world: int, port: int, runs: list[list[str]], out: str) -> None:
    """Trains each override list in turn in one process group (a later Trainer reuses the group); rank 0
    saves what `helpers.run_layout` returns, one dict per run."""
    local_rank_env(rank, world, port)
    results = []
    for i, overrides in enumerate(runs):
        trainer = make_trainer(compose([*overrides, f"run.dir={out}.{i}"]))
        initial = full_state_dict(trainer.pm)
        history = trainer.fit()  # the metrics are rank 0's
        facts = [None] * world
        dist.all_gather_object(facts, layout_facts(trainer))
        results.append({"history": history, "initial": initial, "state": full_state_dict(trainer.pm), "layout": facts})
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> list[tuple[list[str], dict]]:
    """(overrides, rank 0's result) of every layout in LAYOUTS, then of MICRO_STEP."""
    out = tmp_path_factory.mktemp("balance") / "runs.pt"
    runs = [*([*golden.BASE, *GLOBAL, *layout.overrides()] for layout in LAYOUTS), MICRO_STEP]
    spawn(_rank_layouts, (2, free_port(), runs, str(out)), 2)
    return list(zip(runs, torch.load(out, weights_only=True), strict=True))


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("index", range(len(LAYOUTS)), ids=[layout.name() for layout in LAYOUTS])
def test_global_batch_balancing_trains_like_one_process(index, trained, tmp_path_factory):
    overrides, got = trained[index]
    golden.assert_layout_applied(overrides, 2, got)
    assert all(h["dropped_frac"] == 0 for h in got["history"])  # dropless: nothing to turn
    golden.assert_same_training(golden.reference(GLOBAL, tmp_path_factory), got)


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_global_batch_loss_is_not_the_micro_batch_loss(trained):
    """Same weights and batch (dp2): step 1's logged balancing loss (the mean of its 4 micro-batches') differs
    between the scopes by far more than the golden's rounding allowance; only micro-batch 0 is the same for
    both, so a trainer that reset the step's counts every micro-batch would log the micro-batch loss."""
    step = trained[0][1]["history"][0]["aux_loss"]
    micro = trained[-1][1]["history"][0]["aux_loss"]
    assert abs(step - micro) > 100 * golden.EXACT.aux_rtol * micro, (step, micro)
