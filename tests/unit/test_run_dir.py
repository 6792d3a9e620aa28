"""A run directory is never silently reused: a new run refuses one holding checkpoints or metrics (one line,
exit 2, the directory byte-for-byte as it was); resume=auto continues it with each step in metrics.jsonl
once, as the dashboard index shows it too; keep-last-K deletes only the saves of the run's own lineage.
Run: .venv/bin/pytest -q tests/unit/test_run_dir.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.parallel import checkpoint as ckpt
from moeyard.profiling.dashboard_index import RunIndex
from moeyard.profiling.sinks import cut_metrics
from moeyard.train.callbacks import Callback
from moeyard.train.checkpointing import check_run_dir
from moeyard.train.trainer import Trainer
from tests.helpers import TINY

SAVES = ["checkpoint.enabled=true", "checkpoint.every=2", "checkpoint.keep=2"]


class Crash(Callback):
    """Raises after step `step` is complete (logged; saved if due), as a crashed node would end the run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if step == self.step:
            raise RuntimeError(f"crash after step {step}")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-step run that saved steps 2 and 4 and crashed after logging step 5."""
    run = tmp_path_factory.mktemp("crashed")
    with pytest.raises(RuntimeError, match="crash after step 5"):
        Trainer(compose([*TINY, *SAVES, f"run.dir={run}"]), callbacks=[Crash(5)]).fit()
    return run


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root`, files with the SHA-256 of their contents."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def logged_steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_new_run_refuses_a_used_run_dir_and_changes_nothing(
    crashed: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = shutil.copytree(crashed, tmp_path / "run")
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", *TINY, f"run.dir={run}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert f"run.dir={run} already holds checkpoints/ (step_2, step_4) and metrics.jsonl (5 lines)" in line
    assert "train.resume=auto" in line and "a new run.dir" in line
    assert snapshot(run) == before  # config.yaml is not written either


def test_resume_from_another_run_into_a_used_run_dir_is_refused(crashed: Path, tmp_path: Path) -> None:
    """A checkpoint of another directory would start another lineage among this directory's saves."""
    run = shutil.copytree(crashed, tmp_path / "run")
    elsewhere = shutil.copytree(crashed / "checkpoints" / "step_4", tmp_path / "other" / "checkpoints" / "step_4")
    with pytest.raises(ckpt.CheckpointError, match=r"run\.dir=.* already holds"):
        check_run_dir(str(run), str(elsewhere), elsewhere)
    check_run_dir(str(run), "auto", None)
    check_run_dir(str(run), str(run / "checkpoints" / "step_2"), run / "checkpoints" / "step_2")
    check_run_dir(str(tmp_path / "new"), "none", None)


def test_resume_auto_continues_with_each_step_logged_once(crashed: Path, tmp_path: Path) -> None:
    run = shutil.copytree(crashed, tmp_path / "run")
    assert logged_steps(run) == [1, 2, 3, 4, 5]
    index = RunIndex(run)  # a dashboard watching the run across the crash and the resume
    index.refresh()
    assert sorted(index.metrics) == [1, 2, 3, 4, 5]
    resumed = Trainer(compose([*TINY, *SAVES, f"run.dir={run}", "train.resume=auto"]))
    assert resumed.step == 4
    assert logged_steps(run) == [1, 2, 3, 4]  # step 5 is trained again, so its old line is gone
    resumed.fit()
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]
    index.refresh()
    summary = index.summary()["metrics"]
    assert summary["count"] == 6 and summary["series"]["loss"]["x"] == [1, 2, 3, 4, 5, 6]
    fresh = RunIndex(run)
    fresh.refresh()
    assert fresh.summary()["metrics"]["series"]["loss"]["x"] == [1, 2, 3, 4, 5, 6]


def test_dashboard_keeps_each_step_once_in_a_file_logged_twice(tmp_path: Path) -> None:
    """A file from before the cut (steps 1-5, then 4-6 again): the index keeps the continuing run's lines."""
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5)] + [{"step": s, "loss": 10.0 + s} for s in (4, 5, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = RunIndex(tmp_path)
    index.refresh()
    loss = index.summary()["metrics"]["series"]["loss"]
    assert loss == {"x": [1, 2, 3, 4, 5, 6], "y": [1.0, 2.0, 3.0, 14.0, 15.0, 16.0]}


def test_cut_metrics_keeps_earlier_steps_and_drops_a_torn_line(tmp_path: Path) -> None:
    lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "lo')
    assert cut_metrics(tmp_path, 2) == 2
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(lines[:2])
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    assert cut_metrics(tmp_path, 2) == 0


def test_keep_last_k_deletes_only_this_runs_saves(crashed: Path, tmp_path: Path) -> None:
    """Another run's saves in the same checkpoints/ survive: one of the same step is moved aside, not deleted."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    foreign = {}
    for name in ("step_2", "step_9"):
        path = shutil.copytree(crashed / "checkpoints" / "step_4", root / name)
        meta = json.loads((path / "meta.json").read_text())
        (path / "meta.json").write_text(json.dumps({**meta, "lineage": "another-run"}))
        foreign[name] = snapshot(path)
    Trainer(compose([*TINY, *SAVES, f"run.dir={run}"])).fit()  # saves 2, 4, 6; keeps 4 and 6
    assert sorted(p.name for p in root.iterdir()) == ["step_2.other-1", "step_4", "step_6", "step_9"]
    assert snapshot(root / "step_2.other-1") == foreign["step_2"]
    assert snapshot(root / "step_9") == foreign["step_9"]
