"""Exact resume: 3 steps + resume to 6 gives bitwise the per-step losses of 6 uninterrupted steps (CPU).

Single process in-process, and one multi-rank layout (2 gloo ranks, ep2 with FSDP) through torch
multiprocessing. The aux-free expert bias is on, so its buffers must round-trip too.
Run: .venv/bin/pytest -q tests/multiproc/test_resume.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeyard.job.compose import compose
from moeyard.parallel.state import full_state_dict
from moeyard.train.trainer import Trainer
from tests.helpers import TINY, free_port, run_layout
from tests.helpers import history_losses as losses


def test_resume_auto_single_process_is_bitwise(tmp_path: Path) -> None:
    full = Trainer(compose([*TINY, f"run.dir={tmp_path / 'full'}"]))
    full_history = full.fit()
    run = tmp_path / "cut"
    first = Trainer(compose([*TINY, f"run.dir={run}", "checkpoint.enabled=true", "train.steps=3"]))
    first.fit()
    assert (run / "checkpoints" / "step_3" / "COMPLETE").is_file()
    # The resumed run has train.steps=6 like the uninterrupted one (the LR schedule depends on it).
    resumed = Trainer(compose([*TINY, f"run.dir={run}", "train.resume=auto"]))
    assert resumed.step == 3
    resumed_history = resumed.fit()
    assert losses(resumed_history) == losses(full_history)[3:]
    a, b = full_state_dict(full.pm), full_state_dict(resumed.pm)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(v.abs().sum() > 0 for k, v in b.items() if k.endswith("expert_bias"))


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    trainer = Trainer(compose([*TINY, f"run.dir={tmp_path}", "train.resume=auto", "train.steps=1"]))
    assert trainer.step == 0


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_resume_multi_rank_is_bitwise(tmp_path: Path) -> None:
    layout = [*TINY, "parallel.ep=2", "parallel.dp_mode=fsdp"]
    ckpt = ["checkpoint.enabled=true", "checkpoint.every=3"]
    full = run_layout([*layout, *ckpt, f"run.dir={tmp_path / 'full'}"], 2, str(tmp_path / "full.pt"), free_port())
    step_3 = tmp_path / "full" / "checkpoints" / "step_3"
    resumed = run_layout(
        [*layout, f"run.dir={tmp_path / 'resumed'}", f"train.resume={step_3}"],
        2,
        str(tmp_path / "resumed.pt"),
        free_port(),
    )
    assert losses(resumed["history"]) == losses(full["history"])[3:]
    for name, value in full["state"].items():
        assert torch.equal(value, resumed["state"][name]), name
