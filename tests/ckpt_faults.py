"""Fault injection for asynchronous checkpoint saves, and a whole-checkpoint reader for comparing saves
(a helpers module, not a test module).

    moeyard train checkpoint.async_save=true \
        'train.callbacks=[{_target_: tests.ckpt_faults.BackgroundWriteKill, step: 4}]'

(with the repository root on PYTHONPATH). Like tests/faults.py, it acts only on the first attempt of a
torchrun job, so a restarted job runs clean.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _FileSystemWriter

from moeyard.parallel.checkpoint import single_process_quiet
from moeyard.parallel.safe_metadata import SafeFileSystemReader
from moeyard.train.callbacks import Callback
from tests.faults import first_attempt

WAIT_S = 60.0
"""Longest wait for the background write to reach the file writer (it gets there in milliseconds)."""


class BackgroundWriteKill(Callback):
    """SIGKILLs a rank (every rank when `rank` is None) at the end of step `step`, while the background write
    of that step's checkpoint is in flight.

    DCP's file writer is held for step_N.tmp (its first call there never returns), so the write can neither
    finish before the kill nor be sealed: the kill is certain to land mid-write whatever the timing. At the
    end of the step the rank checks that training went on with the save still unfinished, waits until the
    writer holds, records what it saw in RUN_DIR/killed_rankR.json, and dies.
    """

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step = step
        self.rank = rank
        self.armed = first_attempt()
        self.writing = threading.Event()
        if self.armed:
            self._hold_writer(f"step_{step}.tmp")

    def _hold_writer(self, directory: str) -> None:
        original = _FileSystemWriter.write_data
        writing = self.writing

        def write_data(writer: _FileSystemWriter, plan: Any, planner: Any) -> Any:
            if Path(writer.path).name == directory:
                writing.set()
                threading.Event().wait()  # held until the process is killed
            return original(writer, plan, planner)

        _FileSystemWriter.write_data = write_data

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> None:
        if not (self.armed and step == self.step and self.rank in (None, trainer.rank)):
            return
        pending = trainer.checkpointer.pending
        assert pending is not None and pending.step == step and not pending.written.done(), pending
        assert self.writing.wait(WAIT_S), f"the background write of step {step} never reached the writer"
        evidence = {"step": step, "in_flight": not pending.written.done(), "tmp": sorted(os.listdir(pending.tmp))}
        (Path(trainer.run_dir) / f"killed_rank{trainer.rank}.json").write_text(json.dumps(evidence))
        os.kill(os.getpid(), signal.SIGKILL)


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint `path`, whole, by key (a test-side read in one process)."""
    metadata = SafeFileSystemReader(path).read_metadata()
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in metadata.state_dict_metadata.items()}
    with single_process_quiet():
        dcp.load(state, storage_reader=SafeFileSystemReader(path, metadata), no_dist=True)
    return state
