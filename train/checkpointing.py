"""The trainer's checkpoint policy: where a run starts (train.resume, train.init_from) and when it saves.

The mechanism (atomic DCP saves, layout-free names, resharding) is in `parallel/checkpoint.py`. The step is
the whole data position (batches are a pure function of seed and step) and the LR schedule is a function of
the step, so model, optimizer, expert biases, step and RNG states are everything a resumed run needs.

A run directory belongs to one run and the runs resumed from it: a new run refuses a directory that holds
checkpoints or metrics (`check_run_dir`), and a resumed run cuts metrics.jsonl back to its checkpoint's step,
so that every step is logged once.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from moeyard.moe.config import ModelConfig, MoEConfig, check_fields, require
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.staging import HostStager
from moeyard.profiling.sinks import METRICS_FILE, cut_metrics
from moeyard.train.callbacks import Callback

WeightLoader = Callable[[object], None]
"""Fills a built ParallelModel's shards from weights outside MoEyard's checkpoints (a Hugging Face directory);
the rank entry point passes one (moeyard.interop.weights), so the per-rank run never imports the HF code."""


@dataclass(kw_only=True)
class CheckpointConfig:
    """Distributed checkpoints."""

    enabled: bool | None = None
    """Write checkpoints: every N steps, at the end, and on SIGTERM (then exit 143). null (the default): on
    for a run of more than AUTO_MIN_STEPS steps, one started from train.init_from (a fine-tune, `moeyard
    import`) or one that sets `every`; the short runs of smoke tests and CI stay quick and write nothing."""
    every: int | None = None
    """Save every N steps (0 = only at the end and on SIGTERM). null: a tenth of train.steps, at least 10 and
    at most 1000 steps: a crash loses at most a tenth of the run (and never more than 1000 steps), and a run
    writes at most ~10 saves, so saving costs little next to training."""
    keep: int = 2
    """Keep the newest K complete checkpoints of this run (older ones are deleted after a save). 2: the newest
    can be unusable (a disk filled up, a node died while it was copied) and resume=auto then takes the one
    before it; more only costs disk."""
    async_save: bool = False
    """Write each save in a background thread (DCP async_save, after one copy of the shards into host buffers
    that every save reuses, pinned on CUDA); it is sealed at the next save or at the end of the run (SIGTERM
    included), once every rank's write has finished."""

    def check(self) -> None:
        """Raises ValueError naming the first field whose value breaks a rule."""
        check_fields(self, "checkpoint.")
        every = 0 if self.every is None else self.every
        require(every >= 0, "checkpoint.every", self.every, "must be >= 0 (0 = only at the end and on SIGTERM)")
        require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")
        on = "needs checkpoint.enabled=true (or null, the default, which a nonzero every turns on)"
        require(every == 0 or self.enabled is not False, "checkpoint.every", self.every, on)

    def resolved(self, steps: int, init_from: str | None) -> CheckpointConfig:
        """This config with `enabled` and `every` decided for a run of `steps` steps (see their docs)."""
        enabled = self.enabled
        if enabled is None:
            enabled = steps > AUTO_MIN_STEPS or bool(init_from) or bool(self.every)
        every = self.every if self.every is not None else min(1000, max(10, steps // 10))
        return replace(self, enabled=enabled, every=every)


AUTO_MIN_STEPS = 20
"""checkpoint.enabled=null saves runs longer than this (a run this short loses little when it is not saved)."""


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json beside safetensors), not a moeyard checkpoint."""
    path = Path(path)
    return (path / "config.json").is_file() and not (path / "meta.json").is_file()


def preflight(resume: str, init_from: str | None, run_dir: str, model: ModelConfig, moe: MoEConfig) -> None:
    """Checks train.resume, train.init_from and run.dir before any rank starts (writing nothing); raises
    CheckpointError (one line).

    An explicit train.resume and a train.init_from checkpoint are verified against their checksums here.
    Under resume=auto the ranks verify (each reads its share of the files) and report what they pass over."""
    verify = None if resume == "auto" else ckpt.verify_checksums
    found = ckpt.resolve(resume, run_dir, "train.resume", on_skip=lambda line: None, verify=verify)
    if found is not None:
        ckpt.check_compatible(found[1], model, moe, "train.resume", found[0])
    if init_from and not is_hf_dir(init_from):  # Hugging Face directories are checked by moeyard.interop
        path, meta = ckpt.resolve(init_from, run_dir, "train.init_from")
        ckpt.check_compatible(meta, model, moe, "train.init_from", path)
    check_run_dir(run_dir, resume, found and found[0])


def check_run_dir(run_dir: str, resume: str, resume_path: Path | None) -> None:
    """A run continues the run in run.dir (resume=auto, or a checkpoint of that directory) or starts in a
    directory that holds no checkpoints or metrics: otherwise its saves and its log would be mixed with
    another run's, and keep-last-K would take turns with it."""
    root = ckpt.checkpoint_root(run_dir)
    continues = resume == "auto" or (resume_path is not None and resume_path.resolve().parent == root.resolve())
    held = [] if continues else what_run_dir_holds(Path(run_dir))
    if held:
        raise ckpt.CheckpointError(
            f"run.dir={run_dir} already holds {' and '.join(held)} of an earlier run (rule: a run directory is "
            "never reused: continue that run with train.resume=auto, or give a new run.dir)"
        )


def what_run_dir_holds(run_dir: Path) -> list[str]:
    """Short descriptions of the checkpoints and metrics in `run_dir` (empty when it has neither)."""
    held = []
    root = ckpt.checkpoint_root(run_dir)
    saves = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    if saves:
        shown = ", ".join(saves[:3]) + (f", ... ({len(saves)} in all)" if len(saves) > 3 else "")
        held.append(f"{ckpt.CHECKPOINTS}/ ({shown})")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        with metrics.open("rb") as f:
            held.append(f"{METRICS_FILE} ({sum(1 for _ in f)} lines)")
    return held


def verify_on_ranks(path: Path, meta: dict, field: str) -> None:
    """`ckpt.verify_checksums` with the reading split over the ranks (a collective): each rank checks every
    world-th file, and every rank raises the same CheckpointError if any file differs."""
    if not dist.is_initialized():
        ckpt.verify_checksums(path, meta, field)
        return
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        ckpt.verify_checksums(path, meta, field, share=(rank, world))
        problem = None
    except ckpt.CheckpointError as err:
        problem = str(err)
    problems: list[str | None] = [None] * world
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise ckpt.CheckpointError(first)


def find_resume(resume: str, run_dir: str, rank: int, model: ModelConfig, moe: MoEConfig) -> tuple[Path, dict] | None:
    """The checkpoint train.resume names, checked against the model (path, meta.json and checksums), or None.

    Called on every rank before the model is built, so a resumed run can skip initialising weights that the
    load overwrites. The launcher checked it before spawning; rank 0 reports checkpoints that resume=auto
    passes over. A run that continues (resume=auto or a path) first cuts metrics.jsonl back to the step it
    continues from: the steps after it are trained and logged again.
    """
    if resume == "none" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        resume = "auto"  # a restarted worker group continues its job; it never starts it over
    skipped = lambda line: print(f"moeyard: {line}", flush=True) if rank == 0 else None
    found = ckpt.resolve(resume, run_dir, "train.resume", on_skip=skipped, verify=verify_on_ranks)
    if found is not None:
        ckpt.check_compatible(found[1], model, moe, "train.resume", found[0])
    if resume != "none" and rank == 0:
        step = found[1]["step"] if found else 0
        cut = cut_metrics(Path(run_dir), step)
        if cut:
            print(f"moeyard: {METRICS_FILE}: dropped {cut} lines after step {step} (they are trained again)")
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
        self.lineage = uuid.uuid4().hex
        """Which run's saves keep-last-K may delete: a fresh run's own id, or the one its checkpoint carries.
        Only rank 0's is used (it seals and rotates); the others never write meta.json."""
        self.pending: ckpt.PendingSave | None = None
        """An async save still being written (or written but not yet sealed)."""
        # The background write runs DCP's collectives from its own thread while training runs its own: a
        # separate gloo group (every rank creates it here, in the same order) keeps the two apart.
        background = cfg.enabled and cfg.async_save and dist.is_initialized()
        self.save_group = dist.new_group(backend="gloo") if background else None
        self.stager = HostStager() if cfg.enabled and cfg.async_save else None
        """The host copies async saves write from: allocated by the first save, reused by the next ones."""

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
            self.lineage = meta.get("lineage") or self.lineage  # a save from before lineages: a new one
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
                path, meta = ckpt.resolve(init_from, self.run_dir, "train.init_from", verify=verify_on_ranks)
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
            if final:
                self._note(
                    f"run ended at step {step} without a checkpoint (checkpoint.enabled=false; by default it is "
                    f"on for runs of more than {AUTO_MIN_STEPS} steps or from train.init_from)"
                )
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
            {**self.meta(), "lineage": self.lineage},
            stager=self.stager,
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
