"""One golden case trained twice in the same process group gives bitwise identical results.

The golden contract compares a layout with one process within rounding; this is its other half: a layout's
run is deterministic, so whatever differs from one process is the layout's, never run-to-run noise (thread
scheduling, collective arrival order, state left over from an earlier run in the same process). The case
is the golden suite's tensor x expert parallel run with capacity (4 ranks, the probability policy), whose
near-tie decisions would show the smallest nondeterminism. Both runs share one gloo process group: the
second Trainer finds it initialised and reuses it.

    .venv/bin/pytest -q tests/multiproc/test_golden_repeat.py   # ~2 min on 2 idle cores
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moeyard.job.compose import compose
from moeyard.parallel.state import full_state_dict
from tests.helpers import free_port, local_rank_env, make_trainer, spawn
from tests.multiproc import test_golden as golden

TRAINED = ("loss", "aux_loss", "seq_aux_loss", "z_loss", "dropped_frac", "grad_norm", "lr")
"""The metrics a run computes (its timings and throughput differ from run to run)."""


def _case() -> tuple:
    """(id, world, layout overrides, variant) of the golden case with capacity over tp x ep."""
    return next(c for c in golden.LAYOUTS if c[1] == 4 and c[3] == golden.DROPPING)


def _rank_twice(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """Trains `overrides` twice on this rank (each run in its own run directory); rank 0 saves both."""
    local_rank_env(rank, world, port)
    runs = []
    for run in ("first", "second"):
        trainer = make_trainer(compose([*overrides, f"run.dir={out}.{run}"]))
        history = trainer.fit()  # the metrics are rank 0's
        metrics = [[h[k] for k in TRAINED] for h in history] if rank == 0 else []
        runs.append({"history": metrics, "state": full_state_dict(trainer.pm)})
    if rank == 0:
        torch.save(runs, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_golden_case_repeats_bitwise(tmp_path):
    _, world, layout, variant = _case()
    out = str(tmp_path / "runs.pt")
    spawn(_rank_twice, (world, free_port(), [*golden.BASE, *variant, *layout], out), world)
    first, second = torch.load(out, weights_only=True)
    assert first["history"] == second["history"], "the metrics of two identical runs differ"
    assert first["state"].keys() == second["state"].keys()
    differ = [n for n, t in first["state"].items() if not torch.equal(t, second["state"][n])]
    assert not differ, f"{len(differ)} parameters differ between two identical runs: {differ[:5]}"
    assert (torch.tensor([h[TRAINED.index("dropped_frac")] for h in first["history"]]) > 0).all()
