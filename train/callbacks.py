"""Trainer callbacks: the documented extension point for code that runs inside a training job.

Subclass `Callback`, override the hooks you need, and name the class in the config:

    moeyard train 'train.callbacks=[{_target_: mypkg.hooks.SlackOnError, channel: ml}]'

Each entry is instantiated with Hydra's `instantiate` on every rank, so its arguments are the entry's other
keys. Hooks run on every rank, in the listed order, at these points:

- `on_step_end(trainer, step, metrics)`: after step `step` (1-based) is complete: metrics logged (on logged
  steps) and its checkpoint, if one was due, saved.
- `on_checkpoint_written(trainer, step, path)`: after this rank's files of the step-`step` checkpoint are
  written into `path` (the unsealed `step_N.tmp` directory), before the ranks agree to seal it.
- `before_seal(trainer, step, path)`: on rank 0 only, once every rank's files are in `path`, before meta.json
  and the COMPLETE marker are written. Files a callback adds to `path` here become part of the checkpoint
  (listed and size-checked in meta.json).
- `on_error(trainer, error)`: when the run raises, before the error propagates (the process group may be
  broken: do not start collectives here).

The test suite injects its faults (kills, SIGTERM, stalls) through these same hooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Callback:
    """No-op hooks; override the ones you need."""

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        """After step `step` is complete (logged, checkpointed if due)."""

    def on_checkpoint_written(self, trainer: Any, step: int, path: Path) -> None:
        """After this rank's checkpoint files for `step` are in the unsealed directory `path`."""

    def before_seal(self, trainer: Any, step: int, path: Path) -> None:
        """Rank 0, every rank's files written, before meta.json, COMPLETE and the rename."""

    def on_error(self, trainer: Any, error: BaseException) -> None:
        """The run is raising `error`."""


class Callbacks(Callback):
    """Fans each hook out to a list of callbacks, in order."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks

    @classmethod
    def from_config(cls, specs: list[Any]) -> Callbacks:
        """Instantiates `train.callbacks` entries ({_target_: ..., **kwargs}); each must be a Callback."""
        if not specs:
            return cls([])
        # Imported here, not at the top: only configured callbacks need Hydra, and the trainer also runs
        # where it is not installed (benchmarks/gpu_check.py on a GPU machine without hydra-core).
        from hydra.utils import instantiate

        callbacks = []
        for i, spec in enumerate(specs):
            cb = instantiate(spec)
            if not isinstance(cb, Callback):
                raise ValueError(
                    f"train.callbacks[{i}]={spec} made a {type(cb).__name__} "
                    "(rule: each entry must name a subclass of train.callbacks.Callback)"
                )
            callbacks.append(cb)
        return cls(callbacks)

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, step, metrics)

    def on_checkpoint_written(self, trainer: Any, step: int, path: Path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint_written(trainer, step, path)

    def before_seal(self, trainer: Any, step: int, path: Path) -> None:
        for cb in self.callbacks:
            cb.before_seal(trainer, step, path)

    def on_error(self, trainer: Any, error: BaseException) -> None:
        for cb in self.callbacks:
            cb.on_error(trainer, error)
