"""The trainer's checkpoint policy: where a run starts (train.resume, train.init_from) and when it saves.

The mechanism (atomic DCP saves, layout-free names, resharding) is in `parallel/checkpoint.py`. The step is
the whole data position (batches are a pure function of seed and step) and the LR schedule is a function of
the step, so model, optimizer, expert biases, step and RNG states are everything a resumed run needs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.parallel import checkpoint as ckpt
from moeyard.train.callbacks import Callback

WeightLoader = Callable[[object], None]
"""Fills a built ParallelModel's shards from weights outside MoEyard's checkpoints (a Hugging Face directory);
the rank entry point passes one (moeyard.interop.weights), so the per-rank run never imports the HF code."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Distributed checkpoints."""

    enabled: bool = False
    """Write checkpoints: every N steps, at the end, and on SIGTERM (then exit 143)."""
    every: int = 0
    """Save every N steps (0 = only at the end and on SIGTERM); needs enabled=true."""
    keep: int = 2
    """Keep the newest K complete checkpoints (older ones are deleted after a save)."""
    async_save: bool = False
    """Write each save in a background thread (DCP async_save, after a copy of the shards to CPU memory); it is
    sealed at the next save or at the end of the run (SIGTERM included), once every rank's write has finished."""


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json beside safetensors), not a moeyard checkpoint."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "meta.json").is_file()


def preflight(resume: str, init_from: str | None, run_dir: str, model: ModelConfig, moe: MoEConfig) -> None:
    """Checks train.resume and train.init_from before any rank starts; raises CheckpointError (one line).

    Checkpoints that resume=auto passes over are reported by the ranks, which make the same choice."""
    found = ckpt.resolve(resume, run_dir, "train.resume", on_skip=lambda line: None)
    if found is not None:
        ckpt.check_compatible(found[1], model, moe, "train.resume", found[0])
    if init_from and not is_hf_dir(init_from):  # Hugging Face directories are checked by moeyard.interop
        path, meta = ckpt.resolve(init_from, run_dir, "train.init_from")
        ckpt.check_compatible(meta, model, moe, "train.init_from", path)


def find_resume(resume: str, run_dir: str, rank: int, model: ModelConfig, moe: MoEConfig) -> tuple[Path, dict] | None:
    """The checkpoint train.resume names, checked against the model (path and meta.json), or None.

    Called on every rank before the model is built, so a resumed run can skip initialising weights that the
    load overwrites. The launcher checked it before spawning; rank 0 reports checkpoints that resume=auto
    passes over.
    """
    if resume == "none" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"  # a restarted worker group continues its job; it never starts it over
    skipped = lambda line: print(f"moeyard: {line}", flush=True) if rank == 0 else None
    found = ckpt.resolve(resume, run_dir, "train.resume", on_skip=skipped)
    if found is not None:
        ckpt.check_compatible(found[1], model, moe, "train.resume", found[0])
    return found


class Checkpointer:
    """Loads what the run starts from and saves every checkpoint.every steps, at the end and on SIGTERM."""

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: str,
        pm,
        optimizer: torch.optim.Optimizer,
        rank: int,
        callbacks: Callback,
        meta: Callable[[], dict],
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.pm, self.optimizer, self.rank = pm, optimizer, rank
        self.callbacks = callbacks
        self.meta = meta  # what meta.json records besides the step
        self.root = ckpt.checkpoint_root(run_dir)
        self.saved_step: int | None = None
        self.pending: ckpt.PendingSave | None = None
        """An async save still being written (or written but not yet sealed)."""
        # The background write runs DCP's collectives from its own thread while training runs its own: a
        # separate gloo group (every rank creates it here, in the same order) keeps the two apart.
        background = cfg.enabled and cfg.async_save and dist.is_initialized()
        self.save_group = dist.new_group(backend="gloo") if background else None

    def _note(self, text: str) -> None:
        if self.rank == 0:
            print(f"moeyard: {text}", flush=True)

    def restore(
        self,
        found: tuple[Path, dict] | None,
        init_from: str | None,
        model: ModelConfig,
        moe: MoEConfig,
        load_weights: WeightLoader | None = None,
    ) -> int:
        """Loads `found` (train.resume as `find_resume` resolved it: everything) or train.init_from (weights:
        through `load_weights` when given, else a MoEyard checkpoint); returns the step to continue from.

        The launcher checked both before spawning; here each is read once (its meta.json included).
        """
        if found is not None:
            path, meta = found
            ckpt.load(self.pm, self.optimizer, path, meta, "train.resume")
            self.saved_step = meta["step"]
            layout = " ".join(f"{k}={v}" for k, v in meta["layout"].items())
            self._note(f"resumed at step {meta['step']} from {path} (saved on {meta['world_size']} ranks: {layout})")
            return meta["step"]
        if init_from:
            if load_weights is not None:
                load_weights(self.pm)
            elif is_hf_dir(init_from):
                raise ValueError(
                    f"train.init_from={init_from} is a Hugging Face directory, but no weight loader was given "
                    "(rule: start ranks through `moeyard train`, or pass moeyard.interop.weights.loader_for)"
                )
            else:
                path, meta = ckpt.resolve(init_from, self.run_dir, "train.init_from")
                ckpt.check_compatible(meta, model, moe, "train.init_from", path)
                ckpt.load(self.pm, None, path, meta, "train.init_from", weights_only=True)
            self._note(f"initialised weights from {init_from}")
        return 0

    def after_step(self, trainer, step: int, final: bool) -> None:
        """Saves if checkpointing is on and this step is due (or the run ends or was asked to stop).

        An async save is sealed before the next one starts and at the end: a run never exits, nor starts
        another save, while one is being written.
        """
        c = self.cfg
        if not c.enabled:
            return
        due = (final or (c.every > 0 and step % c.every == 0)) and step != self.saved_step
        if self.pending is not None and (due or final):
            self._seal_pending(trainer)
        if not due:
            return
        self.pending = ckpt.start_save(
            self.pm,
            self.optimizer,
            step,
            self.root,
            self.meta(),
            background=c.async_save,
            process_group=self.save_group,
        )
        self.saved_step = step
        if final or not c.async_save:
            self._seal_pending(trainer)

    def _seal_pending(self, trainer) -> None:
        pending, self.pending = self.pending, None
        step = pending.step
        path = ckpt.finish_save(
            pending,
            self.cfg.keep,
            on_written=lambda tmp: self.callbacks.on_checkpoint_written(trainer, step, tmp),
            before_seal=lambda tmp: self.callbacks.before_seal(trainer, step, tmp),
        )
        self._note(f"saved checkpoint {path}")


def checkpoint_meta(world_size: int, layout: dict, model: ModelConfig, moe: MoEConfig, seed: int) -> dict:
    """What meta.json records besides the step: the shape checked on load and the layout saved under."""
    return {"world_size": world_size, "layout": layout, "model": asdict(model), "moe": asdict(moe), "seed": seed}
