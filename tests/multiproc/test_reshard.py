"""Resharding: a checkpoint saved under tp2*ep2 (4 ranks, FSDP) loads under ep4 (4 ranks), pp2 (2 ranks) and
one process. Loaded with nothing left to train, the gathered parameters and AdamW state are the saving run's
bit for bit; resumed at step 3, steps 4-6 give the uninterrupted tp2*ep2 run's losses (fp32, 1e-5 rel), final
parameters and AdamW moments (fp32 tolerances, see `assert_close_state`) and the same step counters. The
one-process loader of `moeyard generate` and `moeyard eval` (no trainer) reads its parameters bit for bit too.

The source layout has FSDP x TP DTensor parameters and expert shards wrapped over the ep axis, and the
targets hold none of those shardings, so model and AdamW state both go through DCP's resharding.
Run: .venv/bin/pytest -q tests/multiproc/test_reshard.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moeyard.interop.generate import load_checkpoint_model
from tests.helpers import TINY, free_port, run_layout
from tests.helpers import history_losses as losses

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(420)]
COMMON = [*TINY, "train.micro_batches=2"]
LAYOUTS = [("ep4", 4, ["parallel.ep=4"]), ("pp2", 2, ["parallel.pp=2"]), ("single", 1, [])]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The uninterrupted tp2*ep2 run (its gathered final state the reference), saving steps 3 and 6."""
    out = tmp_path_factory.mktemp("tp2ep2")
    overrides = [
        *COMMON,
        "parallel.tp=2",
        "parallel.ep=2",
        "parallel.dp_mode=fsdp",
        f"run.dir={out}",
        "checkpoint.enabled=true",
        "checkpoint.every=3",
    ]
    result = run_layout(overrides, 4, str(out / "result.pt"), free_port())
    return out / "checkpoints", result


def assert_close_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Parameters and AdamW moments after three steps under another layout, against the source run's.

    The layouts reduce gradients in another order (TP partial sums, FSDP reduce-scatter, pipeline
    micro-batches), so they differ in the last fp32 bits. Parameters and exp_avg use the golden tests'
    rtol=1e-4, atol=1e-5. exp_avg_sq holds squared gradients, most entries far below 1e-5, which an atol of
    1e-5 would wave through: its atol is 1e-4 of the tensor's largest entry instead. Measured (ep4, pp2,
    single): parameters within 1.2e-7 abs, moments within 7e-7 of their tensor's largest entry, losses within
    1e-7 rel. Step counters are integers stored as floats and must be equal.
    """
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())}"
    for name, w in want.items():
        g = got[name]
        if name.endswith(".step"):
            assert torch.equal(g, w), f"{what} {name}: {g} != {w}"
            continue
        atol = 1e-4 * w.abs().max().item() if name.endswith(".exp_avg_sq") else 1e-5
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}")


@pytest.mark.parametrize(("name", "world", "layout"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_load_under_another_layout_is_exact(source, tmp_path: Path, name: str, world: int, layout: list[str]) -> None:
    """Resumed from step 6 with train.steps=6 (nothing to train), the run holds exactly what the source held
    when it saved: DCP's reshard copies bytes, so parameters, moments and step counters are bitwise equal."""
    root, src = source
    overrides = [*COMMON, *layout, f"run.dir={tmp_path}", f"train.resume={root / 'step_6'}"]
    result = run_layout(overrides, world, str(tmp_path / "result.pt"), free_port())
    assert result["history"] == []
    for what, got, want in [("params", result["state"], src["state"]), ("optim", result["optim"], src["optim"])]:
        assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())}"
        for key, value in want.items():
            assert torch.equal(got[key], value), f"{what} {key}"
    assert {v.item() for k, v in result["optim"].items() if k.endswith(".step")} == {6.0}


@pytest.mark.parametrize(("name", "world", "layout"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_resume_under_another_layout(source, tmp_path: Path, name: str, world: int, layout: list[str]) -> None:
    root, src = source
    meta = json.loads((root / "step_3" / "meta.json").read_text())
    assert meta["layout"] == {"pp": 1, "dp": 2, "tp": 2, "ep": 2, "dp_mode": "fsdp"}
    overrides = [*COMMON, *layout, f"run.dir={tmp_path}", f"train.resume={root / 'step_3'}"]
    result = run_layout(overrides, world, str(tmp_path / "result.pt"), free_port())
    assert [h["step"] for h in result["history"]] == [4, 5, 6]
    assert losses(result["history"]) == pytest.approx(losses(src["history"])[3:], rel=1e-5)
    assert_close_state(result["state"], src["state"], "params")
    assert_close_state(result["optim"], src["optim"], "optim")


def test_generate_and_eval_load_it_in_one_process(source) -> None:
    """`moeyard generate` and `moeyard eval` read the tp2*ep2 (FSDP) save into one process with no trainer:
    every parameter and aux-free bias is the saving run's, bit for bit (DCP's reshard copies bytes)."""
    root, src = source
    model, path, meta = load_checkpoint_model(root, "generate", torch.device("cpu"))
    assert path == root / "step_6" and meta["layout"]["tp"] == meta["layout"]["ep"] == 2
    got = {name: p.detach() for name, p in model.named_parameters()}
    got |= {f"layers.{lid}.moe.router.expert_bias": moe.router.expert_bias for lid, moe in model.moe_layers().items()}
    assert got.keys() == src["state"].keys(), sorted(got.keys() ^ src["state"].keys())
    for name, value in src["state"].items():
        assert torch.equal(got[name], value), name
