"""Fault-injection callbacks for the fault tests (a helpers module, not a test module).

Each is a `train.callbacks.Callback`, so a run takes them the way it takes a user's callbacks:

    moeyard train 'train.callbacks=[{_target_: tests.faults.Fault, kind: kill, step: 5, rank: 1}]'

(with the repository root on PYTHONPATH, so that every rank can import `tests.faults`). They act only on
the first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT unset or 0), so a restarted job runs clean.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from moeyard.parallel.checkpoint import checkpoint_root
from moeyard.train.callbacks import Callback

POLL_S = 0.0005
"""How often the mid-write watcher looks for its shard file: DCP writes a tiny model's shard in milliseconds."""


def first_attempt() -> bool:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0) == 0


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _Targeted(Callback):
    """Acts at one step, on one rank (None: every rank), on the first attempt only."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step = step
        self.rank = rank
        self.armed = first_attempt()

    def applies(self, trainer: Any, step: int) -> bool:
        return self.armed and step == self.step and self.rank in (None, trainer.rank)


class Fault(_Targeted):
    """At the end of step `step` (logged, and checkpointed if due): kill (SIGKILL itself), term (SIGTERM
    itself: the guard finishes the next step, saves and exits 143), raise (RuntimeError) or stall (sleep
    `seconds`, then carry on)."""

    KINDS = ("kill", "term", "raise", "stall")

    def __init__(self, kind: str, step: int, rank: int | None = None, seconds: float = 600.0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"tests.faults.Fault kind={kind} must be one of {', '.join(self.KINDS)}")
        super().__init__(step, rank)
        self.kind = kind
        self.seconds = seconds

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if not self.applies(trainer, step):
            return
        if self.kind == "kill":
            _kill_self()
        elif self.kind == "term":
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.kind == "raise":
            raise RuntimeError(f"tests.faults.Fault: raise at the end of step {step} on rank {trainer.rank}")
        else:
            time.sleep(self.seconds)  # a SIGTERM meanwhile runs the guard's handler; the sleep then goes on


class SaveKill(_Targeted):
    """SIGKILLs a rank while the checkpoint of step `step` is being saved.

    point: "mid_write" — the rank dies while DCP writes its shard: a watcher thread, started at the end of
    the step before, kills it as soon as its `__R_0.distcp` file appears in step_N.tmp (and should the
    write win the race, the rank waits in on_checkpoint_written for the watcher, so it never agrees to
    seal); "written" — once its files are written, before the ranks agree to seal; "seal" — rank 0, every
    rank's files written, before meta.json, COMPLETE and the rename.
    """

    POINTS = ("mid_write", "written", "seal")

    def __init__(self, step: int, rank: int | None = None, point: str = "written") -> None:
        if point not in self.POINTS:
            raise ValueError(f"tests.faults.SaveKill point={point} must be one of {', '.join(self.POINTS)}")
        super().__init__(step, rank)
        self.point = point
        self.watcher: threading.Thread | None = None

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if self.point == "mid_write" and self.applies(trainer, step + 1):
            shard = checkpoint_root(trainer.run_dir) / f"step_{self.step}.tmp" / f"__{trainer.rank}_0.distcp"
            self.watcher = threading.Thread(target=self._kill_when_present, args=(shard,), daemon=True)
            self.watcher.start()

    @staticmethod
    def _kill_when_present(path: Path) -> None:
        while not path.exists():
            time.sleep(POLL_S)
        _kill_self()

    def on_checkpoint_written(self, trainer: Any, step: int, path: Path) -> None:
        if not self.applies(trainer, step):
            return
        if self.point == "mid_write":
            assert self.watcher is not None, "the watcher starts at the end of the step before"
            self.watcher.join()  # the file exists: the watcher is about to kill this process
        elif self.point == "written":
            _kill_self()

    def before_seal(self, trainer: Any, step: int, path: Path) -> None:
        if self.point == "seal" and self.applies(trainer, step):
            _kill_self()


class NanGradient(_Targeted):
    """Puts a real NaN into the gradient of the model's first parameter during step `step` (>= 2): a
    tensor hook, registered at the end of the step before and removed at the end of this one, replaces the
    gradient autograd computes with NaNs."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        if step < 2:
            raise ValueError(f"tests.faults.NanGradient step={step} must be >= 2 (it arms at the step before)")
        super().__init__(step, rank)
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if self.applies(trainer, step + 1):
            _, param = next(iter(trainer.pm.named_parameters()))
            self.handle = param.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        elif self.handle is not None and step == self.step:
            self.handle.remove()
            self.handle = None
