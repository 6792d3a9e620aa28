"""Faults, for real: a rank SIGKILLed under torchrun (max_restarts=1) restarts from the last checkpoint and
ends with the uninterrupted run's losses; a process killed while saving leaves the previous checkpoint
loadable; SIGTERM finishes the step, saves and exits 143 on every rank; a collective timeout makes every
rank print its last collectives; NaN/Inf steps are skipped or halt the run, recorded in metrics.

Faults are injected with the test-only MOEYARD_FAULT hook (launch/faults.py: fault_plan).
Run: .venv/bin/pytest -q tests/multiproc/test_faults.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.cli import main
from launch.config import compose
from parallel import checkpoint as ckpt
from tests.helpers import TINY, free_port
from train.trainer import Trainer

MOEYARD = Path(sys.executable).with_name("moeyard")
CKPT = ["checkpoint.enabled=true", "checkpoint.every=2", "train.resume=auto"]


def torchrun(nproc: int) -> list[str]:
    return ["launcher=torchrun", f"launcher.nproc_per_node={nproc}", f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}"]


def moeyard(run: Path, args: list[str], fault: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    # torchrun shares its rendezvous store with the workers by default, and a restarted group then reads the
    # previous attempt's addresses (pytorch/pytorch#135712); a separate store per attempt avoids that.
    env = {**os.environ, "MOEYARD_FAULT": fault, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(MOEYARD), "train", *TINY, *args, f"run.dir={run}"],
        env=env,
        cwd=run.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses_by_step(run: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    return {m["step"]: m["loss"] for m in metrics(run)}


@pytest.mark.multiproc
@pytest.mark.timeout(420)
def test_killed_rank_restarts_from_last_checkpoint(tmp_path: Path) -> None:
    # No train.resume=auto needed: a restarted worker group always continues from the last checkpoint.
    layout = ["checkpoint.enabled=true", "checkpoint.every=2", "parallel.ep=2"]
    full = moeyard(tmp_path / "full", [*layout, *torchrun(2)])
    assert full.returncode == 0, full.stderr[-3000:]
    killed = moeyard(tmp_path / "killed", [*layout, *torchrun(2), "launcher.max_restarts=1"], fault="kill@5@1")
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "resumed at step 4" in killed.stdout
    steps = [m["step"] for m in metrics(tmp_path / "killed")]
    assert steps == [1, 2, 3, 4, 5, 6]  # the first attempt died in step 5, before logging it
    assert losses_by_step(tmp_path / "killed") == losses_by_step(tmp_path / "full")


def test_kill_during_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    died = moeyard(run, CKPT, fault="save_kill@4")
    assert died.returncode == -9, died.stderr[-3000:]
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_4.tmp"]
    assert (root / "step_4.tmp" / ".metadata").is_file()  # all shards were written, only the seal is missing
    assert ckpt.resolve("auto", run, "train.resume") == root / "step_2"
    before = losses_by_step(run)
    resumed = moeyard(run, CKPT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stdout
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6"]  # stale .tmp removed, keep=2
    after = losses_by_step(run)
    assert after[3] == before[3] and after[4] == before[4]


def test_sigterm_saves_and_exits_143(tmp_path: Path) -> None:
    run = tmp_path / "run"
    stopped = moeyard(run, ["checkpoint.enabled=true"], fault="term@3")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM in step 3" in stopped.stderr
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    assert ckpt.resolve("auto", run, "train.resume") == run / "checkpoints" / "step_3"


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    moeyard(run, ["checkpoint.enabled=true", "parallel.ep=2", *torchrun(2)], fault="term@3@1")
    meta = ckpt.read_meta(ckpt.resolve("auto", run, "train.resume"), "test")
    assert meta["step"] == 3 and meta["world_size"] == 2
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_collective_timeout_makes_every_rank_report(tmp_path: Path) -> None:
    """Rank 1 stalls in step 2; rank 0 times out after launcher.timeout_s=3 in the step's agreement all_reduce."""
    run = tmp_path / "run"
    result = moeyard(run, ["parallel.ep=2", "launcher.timeout_s=3", *torchrun(2)], fault="stall@2@1")
    assert result.returncode != 0
    rank0 = result.stdout + result.stderr
    assert re.search(r"rank 0 step 2 all_reduce group=dp/ep\[0, 1\] shape=\(2,\) raised for [3-9]", rank0), rank0
    rank1 = (run / "logs" / "rank_1.log").read_text()
    # Rank 1 was outside collectives when torchrun stopped it: its SIGTERM line names its last one, in which
    # it then failed (rank 0 had gone).
    assert "moeyard rank 1: SIGTERM in step 2 (last collective entered: step 2 all_reduce" in rank1
    assert re.search(r"rank 1 step 2 all_reduce group=dp/ep\[0, 1\] shape=\(2,\) raised", rank1), rank1


def test_nonfinite_step_is_skipped_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOEYARD_FAULT", "nan@2")
    trainer = Trainer(compose([*TINY, "train.steps=4", "train.nonfinite=skip", f"run.dir={tmp_path}"]))
    history = trainer.fit()
    assert [h.get("nonfinite", 0) for h in history] == [0, 1, 0, 0]
    assert history[1]["skipped_steps"] == 1
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[1]["step"] == 2 and logged[1]["nonfinite"] == 1
    # AdamW counted three updates in four steps: step 2 changed nothing.
    assert all(float(s["step"]) == 3 for s in trainer.optimizer.state.values())


def test_nonfinite_loss_halts_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    rc = main(["train", *TINY, "model.init_std=1e30", f"run.dir={run}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "step 1: non-finite loss or gradients" in err[0] and "train.nonfinite=halt" in err[0]
    assert metrics(run)[-1] == {**metrics(run)[-1], "step": 1, "nonfinite": 1, "halted": 1}
    assert torch.isnan(torch.tensor(metrics(run)[-1]["grad_norm"]))
