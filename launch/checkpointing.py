"""The trainer's checkpoint policy: where a run starts (train.resume, train.init_from) and when it saves.

The mechanism (atomic DCP saves, layout-free names, resharding) is in `parallel/checkpoint.py`. The step is
the whole data position (batches are a pure function of seed and step) and the LR schedule is a function of
the step, so model, optimizer, expert biases, step and RNG states are everything a resumed run needs.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch.distributed as dist

from launch.config import JobConfig
from parallel import checkpoint as ckpt


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json beside safetensors), not a moeyard checkpoint."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "meta.json").is_file()


def preflight(cfg: JobConfig) -> None:
    """Checks train.resume and train.init_from before any rank starts; raises CheckpointError (one line)."""
    t = cfg.train
    path = ckpt.resolve(t.resume, cfg.run.dir, "train.resume")
    if path is not None:
        ckpt.check_compatible(ckpt.read_meta(path, "train.resume"), cfg.model, cfg.moe, "train.resume", path)
    if t.init_from:
        if is_hf_dir(t.init_from):
            from launch.hf import check_hf_dir

            check_hf_dir(Path(t.init_from), cfg, "train.init_from")
            return
        path = ckpt.resolve(t.init_from, cfg.run.dir, "train.init_from")
        meta = ckpt.read_meta(path, "train.init_from")
        ckpt.check_compatible(meta, cfg.model, cfg.moe, "train.init_from", path)


class Checkpointer:
    """Loads what the run starts from and saves every checkpoint.every steps, at the end and on SIGTERM."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.cfg: JobConfig = trainer.cfg
        self.root = ckpt.checkpoint_root(self.cfg.run.dir)
        self.saved_step: int | None = None

    def _note(self, text: str) -> None:
        if self.trainer.rank == 0:
            print(f"moeyard: {text}", flush=True)

    def restore(self) -> int:
        """Loads train.resume (everything) or train.init_from (weights); returns the step to continue from."""
        cfg, tr = self.cfg, self.trainer
        preflight(cfg)
        resume = cfg.train.resume
        if resume == "none" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume = "auto"  # a restarted worker group continues its job; it never starts it over
        path = ckpt.resolve(resume, cfg.run.dir, "train.resume")
        if path is not None:
            meta = ckpt.load(tr.pm, tr.optimizer, path, "train.resume")
            self.saved_step = meta["step"]
            layout = " ".join(f"{k}={v}" for k, v in meta["layout"].items())
            self._note(f"resumed at step {meta['step']} from {path} (saved on {meta['world_size']} ranks: {layout})")
            return meta["step"]
        if cfg.train.init_from:
            if is_hf_dir(cfg.train.init_from):
                from launch.hf import load_hf_weights

                load_hf_weights(tr.pm, Path(cfg.train.init_from), cfg)
            else:
                path = ckpt.resolve(cfg.train.init_from, cfg.run.dir, "train.init_from")
                ckpt.load(tr.pm, None, path, "train.init_from", weights_only=True)
            self._note(f"initialised weights from {cfg.train.init_from}")
        return 0

    def after_step(self, step: int, final: bool) -> None:
        """Saves if checkpointing is on and this step is due (or the run ends or was asked to stop)."""
        c = self.cfg.checkpoint
        due = final or (c.every > 0 and step % c.every == 0)
        if not c.enabled or not due or step == self.saved_step:
            return
        tr = self.trainer
        ckpt.save(
            tr.pm,
            tr.optimizer,
            step,
            self.root,
            c.keep,
            self.meta(),
            fault=lambda point: tr.guard.fault(point, step),
        )
        self.saved_step = step
        self._note(f"saved checkpoint {self.root / f'step_{step}'}")

    def meta(self) -> dict:
        """What meta.json records besides the step: the shape checked on load and the layout saved under."""
        cfg, dims = self.cfg, self.trainer.dims
        return {
            "world_size": dist.get_world_size() if dist.is_initialized() else 1,
            "layout": {
                "pp": dims.pp,
                "dp": dims.dp,
                "tp": dims.tp,
                "ep": dims.ep,
                "dp_mode": cfg.parallel.dp_mode,
            },
            "model": asdict(cfg.model),
            "moe": asdict(cfg.moe),
            "seed": cfg.train.seed,
        }
