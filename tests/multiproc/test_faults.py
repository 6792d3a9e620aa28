"""Faults, for real: a rank SIGKILLed under torchrun (max_restarts=1) restarts from the last checkpoint and
ends with the uninterrupted run's losses; a rank killed while saving (after its files are written, while
DCP writes them, or just before the seal; on one rank and on two) leaves the previous checkpoint, which
resume=auto picks, and the resumed run ends with the uninterrupted run's losses; resume=auto says which
unreadable checkpoint it skipped; SIGTERM finishes the step, saves and exits 143 on every rank; a collective
timeout makes every rank print its last collectives; a real NaN gradient is skipped or halts the run,
recorded in metrics.

Faults are injected by the callbacks in tests/faults.py, passed as `train.callbacks` overrides like any
user's callbacks (the ranks import them from the repository root, put on PYTHONPATH). They act at the end of
a step, that is after the step is logged and checkpointed.
Run: .venv/bin/pytest -q tests/multiproc/test_faults.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.parallel import checkpoint as ckpt
from moeyard.train.trainer import Trainer
from tests.helpers import MOEYARD, REPO, TINY, free_port

CKPT = ["checkpoint.enabled=true", "checkpoint.every=2"]
EP2 = [*CKPT, "parallel.ep=2"]
"""Two ranks (with torchrun(2)), experts split over both."""


def torchrun(nproc: int) -> list[str]:
    return ["launcher=torchrun", f"launcher.nproc_per_node={nproc}", f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}"]


def callback(name: str, **kwargs: object) -> str:
    """The override that gives a run the fault callback tests.faults.NAME(**kwargs)."""
    args = "".join(f",{key}:{value}" for key, value in kwargs.items())
    return f"train.callbacks=[{{_target_:tests.faults.{name}{args}}}]"


def moeyard(run: Path, args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """`moeyard train TINY ARGS run.dir=RUN` through the installed console script, from RUN's parent."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return subprocess.run(
        [str(MOEYARD), "train", *TINY, *args, f"run.dir={run}"],
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
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


def auto_resume_pick(run: Path) -> Path | None:
    found = ckpt.resolve("auto", run, "train.resume")
    return found and found[0]


def checkpoint_dirs(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Losses by step of the EP2 run on two torchrun ranks, with no fault."""
    run = tmp_path_factory.mktemp("faults") / "uninterrupted"
    full = moeyard(run, [*EP2, *torchrun(2)])
    assert full.returncode == 0, full.stderr[-3000:]
    assert sorted(losses_by_step(run)) == [1, 2, 3, 4, 5, 6]
    return losses_by_step(run)


@pytest.mark.multiproc
@pytest.mark.timeout(480)
def test_killed_rank_restarts_from_last_checkpoint(tmp_path: Path, uninterrupted: dict[int, float]) -> None:
    # No train.resume=auto needed: a restarted worker group always continues from the last checkpoint.
    run = tmp_path / "killed"
    kill = callback("Fault", kind="kill", step=5, rank=1)
    killed = moeyard(run, [*EP2, *torchrun(2), "launcher.max_restarts=1", kill])
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "resumed at step 4" in killed.stdout
    # The first attempt died at the end of step 5 (logged, not checkpointed); the second cut that line from
    # metrics.jsonl and redid steps 5-6: each step is logged once.
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert losses_by_step(run) == uninterrupted


@pytest.mark.timeout(300)
def test_kill_during_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    died = moeyard(run, [*CKPT, callback("SaveKill", step=4, point="written")])
    assert died.returncode == -9, died.stderr[-3000:]
    root = run / "checkpoints"
    assert checkpoint_dirs(run) == ["step_2", "step_4.tmp"]
    assert (root / "step_4.tmp" / ".metadata").is_file()  # all shards were written, only the seal is missing
    assert auto_resume_pick(run) == root / "step_2"
    before = losses_by_step(run)
    assert sorted(before) == [1, 2, 3, 4]  # step 4 was logged before its checkpoint
    resumed = moeyard(run, [*CKPT, "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stdout
    assert checkpoint_dirs(run) == ["step_4", "step_6"]  # stale .tmp removed, keep=2
    after = losses_by_step(run)
    assert after[3] == before[3] and after[4] == before[4]


@pytest.mark.multiproc
@pytest.mark.timeout(480)
@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(callback("SaveKill", step=4, rank=1, point="mid_write"), id="mid_write"),
        pytest.param(callback("SaveKill", step=4, point="seal"), id="mid_seal"),
    ],
)
def test_kill_during_save_on_two_ranks(tmp_path: Path, uninterrupted: dict[int, float], fault: str) -> None:
    """mid_write: rank 1 dies as its shard of step 4 appears; mid_seal: rank 0 dies with every shard of step 4
    written, before meta.json. Either way step 4 is never sealed, and only outcomes that hold whatever the
    exact timing are asserted."""
    run = tmp_path / "run"
    died = moeyard(run, [*EP2, *torchrun(2), fault])
    assert died.returncode != 0, died.stderr[-3000:]
    root = run / "checkpoints"
    assert not (root / "step_4").exists(), checkpoint_dirs(run)
    assert auto_resume_pick(run) == root / "step_2", checkpoint_dirs(run)
    resumed = moeyard(run, [*EP2, *torchrun(2), "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at step 2 from {root / 'step_2'}" in resumed.stdout
    assert losses_by_step(run) == uninterrupted
    assert checkpoint_dirs(run) == ["step_4", "step_6"]


@pytest.mark.timeout(300)
def test_resume_auto_says_which_checkpoint_it_skipped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = moeyard(run, [*CKPT, "train.steps=4"])
    assert first.returncode == 0, first.stderr[-3000:]
    first_losses = [m["loss"] for m in metrics(run)]
    root = run / "checkpoints"
    newest = root / "step_4"
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a disk that filled up after the seal
    resumed = moeyard(run, [*CKPT, "train.steps=4", "train.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = resumed.stdout.splitlines()
    skipped = next(i for i, line in enumerate(lines) if f"train.resume=auto skipped {newest}: " in line)
    assert "__0_0.distcp has 100 bytes, meta.json records" in lines[skipped]
    resumed_at = next(i for i, line in enumerate(lines) if f"resumed at step 2 from {root / 'step_2'}" in line)
    assert skipped < resumed_at
    assert [m["step"] for m in metrics(run)] == [1, 2, 3, 4]  # steps 3-4 cut, then logged again
    assert [m["loss"] for m in metrics(run)] == first_losses


@pytest.mark.timeout(300)
def test_sigterm_saves_and_exits_143(tmp_path: Path) -> None:
    run = tmp_path / "run"
    stopped = moeyard(run, ["checkpoint.enabled=true", callback("Fault", kind="term", step=2)])
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "SIGTERM in step 3" in stopped.stderr  # signalled between steps 2 and 3: step 3 is finished
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]
    assert auto_resume_pick(run) == run / "checkpoints" / "step_3"


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    term = callback("Fault", kind="term", step=2, rank=1)
    stopped = moeyard(run, ["checkpoint.enabled=true", "parallel.ep=2", *torchrun(2), term])
    assert stopped.returncode != 0  # torchrun reports its workers' exit 143 as a failure
    assert "moeyard rank 1: SIGTERM in step 3" in (run / "logs" / "rank_1.log").read_text()
    path, meta = ckpt.resolve("auto", run, "train.resume")
    assert path == run / "checkpoints" / "step_3" and meta["world_size"] == 2
    assert [m["step"] for m in metrics(run)] == [1, 2, 3]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_collective_timeout_makes_every_rank_report(tmp_path: Path) -> None:
    """Rank 1 stalls 30 s after step 1; rank 0 times out after launcher.timeout_s=10 in step 2's first
    collective. (launcher.timeout_s also bounds the rendezvous: much less than 10 s fails on a busy machine
    before the ranks have started.)"""
    run = tmp_path / "run"
    stall = callback("Fault", kind="stall", step=1, rank=1, seconds=30)
    result = moeyard(run, ["parallel.ep=2", "launcher.timeout_s=10", *torchrun(2), stall])
    assert result.returncode != 0
    rank0 = result.stdout + result.stderr
    waited = re.search(r"rank 0 step 2 \w+ group=[\w/]+\[0, 1\] shape=\(\d+,?\) raised for ([\d.]+) s", rank0)
    assert waited and 10 <= float(waited[1]) < 30, rank0
    rank1 = (run / "logs" / "rank_1.log").read_text()
    # Rank 1 was stalled outside collectives when torchrun stopped it: its SIGTERM line names its last one
    # (done). Its stall then ended and it failed in step 2's first collective (rank 0 had gone).
    assert re.search(r"moeyard rank 1: SIGTERM in step 2 \(last collective entered: .* ok\)", rank1), rank1
    assert re.search(r"rank 1 step 2 \w+ group=[\w/]+\[0, 1\] shape=\(\d+,?\) raised", rank1), rank1


def test_nonfinite_step_is_skipped_and_recorded(tmp_path: Path) -> None:
    nan = callback("NanGradient", step=2)  # a real NaN: autograd's gradient of one parameter, replaced
    trainer = Trainer(compose([*TINY, "train.steps=4", "train.nonfinite=skip", nan, f"run.dir={tmp_path}"]))
    history = trainer.fit()
    assert [h.get("nonfinite", 0) for h in history] == [0, 1, 0, 0]
    assert history[1]["skipped_steps"] == 1 and torch.isnan(torch.tensor(history[1]["grad_norm"]))
    assert all(torch.isfinite(torch.tensor(h["grad_norm"])) for i, h in enumerate(history) if i != 1)
    logged = metrics(tmp_path)
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
