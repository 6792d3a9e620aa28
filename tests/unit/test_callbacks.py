"""Trainer callbacks (train/callbacks.py), in one process: a callback named in `train.callbacks` and one
passed to `Trainer(cfg, callbacks=[...])` see on_step_end for every step with its metrics,
on_checkpoint_written and before_seal with the unsealed step_N.tmp directory (a file written there in
before_seal becomes part of the sealed checkpoint, listed in meta.json), and on_error when the run raises;
a `_target_` that is not a Callback is refused in one line naming its entry.

Run: .venv/bin/pytest -q tests/unit/test_callbacks.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.parallel import checkpoint as ckpt
from moeyard.train.callbacks import Callback
from moeyard.train.trainer import Trainer, train
from tests.helpers import TINY

NOTE = "note.txt"


class Recorder(Callback):
    """Records each hook call as [hook, step, detail] (and appends it to `log`, a JSON-lines file, if given);
    with `note`, writes NOTE into the checkpoint directory in before_seal."""

    def __init__(self, log: str | None = None, note: bool = False) -> None:
        self.events: list[list[Any]] = []
        self.log = log
        self.note = note

    def _record(self, *event: Any) -> None:
        self.events.append(list(event))
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps(list(event)) + "\n")

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        self._record("on_step_end", step, {"step": metrics["step"], "has_loss": "loss" in metrics})

    def on_checkpoint_written(self, trainer: Any, step: int, path: Path) -> None:
        self._record("on_checkpoint_written", step, str(path), sorted(p.name for p in path.iterdir()))

    def before_seal(self, trainer: Any, step: int, path: Path) -> None:
        self._record("before_seal", step, str(path), sorted(p.name for p in path.iterdir()))
        if self.note:
            (path / NOTE).write_text(f"written by a callback at step {step}\n")

    def on_error(self, trainer: Any, error: BaseException) -> None:
        self._record("on_error", trainer.step, f"{type(error).__name__}: {error}")


def target(name: str, **kwargs: object) -> str:
    """A train.callbacks entry for the override syntax: {_target_:NAME,key:value,...}."""
    return "{" + ",".join([f"_target_:{name}", *(f"{k}:{v}" for k, v in kwargs.items())]) + "}"


RECORDER = f"{__name__}.Recorder"
CHECKPOINTS = ["checkpoint.enabled=true", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Recorder, Recorder]:
    """Three steps, checkpoints at 2 and 3; one Recorder from the config, one (writing NOTE) from Python."""
    run = tmp_path_factory.mktemp("callbacks")
    callbacks = f"train.callbacks=[{target(RECORDER)}]"
    cfg = compose([*TINY, "train.steps=3", *CHECKPOINTS, f"run.dir={run}", callbacks])
    programmatic = Recorder(note=True)
    trainer = Trainer(cfg, callbacks=[programmatic])
    trainer.fit()
    from_config = trainer.callbacks.callbacks[0]
    return trainer, from_config, programmatic


def test_config_callbacks_run_first_then_programmatic_ones(fitted) -> None:
    trainer, from_config, programmatic = fitted
    assert isinstance(from_config, Recorder) and from_config is not programmatic
    assert trainer.callbacks.callbacks == [from_config, programmatic]
    assert from_config.events == programmatic.events  # NOTE is written after each recorder lists the files


def test_hooks_see_each_step_and_the_unsealed_checkpoint(fitted) -> None:
    trainer, _, seen = fitted
    root = ckpt.checkpoint_root(trainer.run_dir)
    assert [e[0:2] for e in seen.events] == [
        ["on_step_end", 1],
        ["on_checkpoint_written", 2],
        ["before_seal", 2],
        ["on_step_end", 2],
        ["on_checkpoint_written", 3],
        ["before_seal", 3],
        ["on_step_end", 3],
    ]
    for hook, step, *detail in seen.events:
        if hook == "on_step_end":
            assert detail == [{"step": step, "has_loss": True}]
        else:
            path, files = detail
            assert path == str(root / f"step_{step}.tmp")
            assert "__0_0.distcp" in files and "meta.json" not in files and "COMPLETE" not in files


def test_a_file_written_before_the_seal_is_part_of_the_checkpoint(fitted) -> None:
    trainer, _, _ = fitted
    for step in (2, 3):
        path = ckpt.checkpoint_root(trainer.run_dir) / f"step_{step}"
        assert (path / "COMPLETE").is_file()
        assert (path / NOTE).read_text() == f"written by a callback at step {step}\n"
        meta = ckpt.read_meta(path, "test")  # checks every listed file's size
        assert meta["files"][NOTE] == (path / NOTE).stat().st_size


def test_on_error_sees_the_error_the_run_raises(tmp_path: Path) -> None:
    log = tmp_path / "events.jsonl"
    callbacks = [target(RECORDER, log=f"'{log}'"), target("tests.faults.Fault", kind="raise", step=2)]
    cfg = compose([*TINY, "train.steps=4", f"run.dir={tmp_path / 'run'}", f"train.callbacks=[{','.join(callbacks)}]"])
    with pytest.raises(RuntimeError, match="raise at the end of step 2"):
        train(cfg)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e[0:2] for e in events] == [["on_step_end", 1], ["on_step_end", 2], ["on_error", 2]]
    assert events[-1][2] == "RuntimeError: tests.faults.Fault: raise at the end of step 2 on rank 0"


def test_a_target_that_is_not_a_callback_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    rc = main(["train", *TINY, f"train.callbacks=[{target('collections.OrderedDict')}]", f"run.dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "train.callbacks[0]=" in err[0] and "made a OrderedDict" in err[0]
    assert "subclass of train.callbacks.Callback" in err[0]
