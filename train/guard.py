"""The step guard on every rank: SIGTERM and non-finite steps.

- SIGTERM (Slurm's time limit, torchrun stopping its workers) only sets a flag. Ranks agree on it at the
  next step, finish that step, save a checkpoint and exit 143, so no rank stops inside a collective.
- A step whose loss or gradient norm is NaN/Inf is skipped or halts the run (train.nonfinite); the step is
  marked `nonfinite` in metrics.jsonl either way.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from profiling.sinks import MetricsLog
from train.collectives import CollectiveLog


class NonFiniteError(ValueError):
    """A step produced NaN/Inf under train.nonfinite=halt (a ValueError: the CLI shows it as one line)."""


class StepGuard:
    """Per-rank SIGTERM flag and non-finite step policy; the trainer calls `skip_step` once per step."""

    def __init__(
        self, policy: str, rank: int, log: MetricsLog, collectives: CollectiveLog, current_step: Callable[[], int]
    ) -> None:
        self.policy = policy
        self.rank = rank
        self.log = log
        self.collectives = collectives
        self.current_step = current_step  # the 1-based step in progress
        self.stop_requested = False
        self.skipped_steps = 0
        self.bad_step = False
        self._terminated = False
        self._previous = None
        self._handling = False

    def _handle_sigterm(self) -> None:
        """From the first step to the end of fit (a trainer that never trains keeps the default)."""
        if not self._handling and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._handling = True

    def _on_sigterm(self, signum, frame) -> None:
        self._terminated = True
        # One line, so a rank stuck outside collectives still says where it was; os.write because a
        # handler may interrupt a print in progress.
        line = (
            f"moeyard rank {self.rank}: SIGTERM in step {self.current_step()} (last collective entered: "
            f"{self.collectives.last()}); finishing the step, then saving and exiting\n"
        )
        os.write(2, line.encode())

    def close(self) -> None:
        """Gives SIGTERM back its previous handler."""
        if self._handling:
            signal.signal(signal.SIGTERM, self._previous)
            self._handling = False

    def skip_step(self, losses: list[torch.Tensor], grad_norm: torch.Tensor) -> bool:
        """After backward: agrees on non-finite values and SIGTERM across ranks; True = skip the update."""
        step = self.current_step()
        self._handle_sigterm()
        norm = float(grad_norm)
        local_bad = not math.isfinite(norm) or any(not bool(torch.isfinite(x).all()) for x in losses)
        flags = torch.tensor([float(local_bad), float(self._terminated)], device=grad_norm.device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self.stop_requested = self.stop_requested or bool(flags[1] > 0)
        self.bad_step = bool(flags[0] > 0)
        if not self.bad_step:
            return False
        loss = float(torch.stack([x.float().mean() for x in losses]).mean()) if losses else float("nan")
        if self.policy == "halt":
            self.log.write({"step": step, "loss": loss, "grad_norm": norm, "nonfinite": 1, "halted": 1})
            raise NonFiniteError(
                f"step {step}: non-finite loss or gradients (loss={loss:.4g}, grad_norm={norm:.4g}) "
                "(rule: train.nonfinite=halt stops the run; lower optim.lr, or set "
                "train.nonfinite=skip to drop such steps)"
            )
        self.skipped_steps += 1
        if self.rank == 0:
            print(
                f"moeyard: step {step}: non-finite loss or gradients (grad_norm={norm:.4g}); update skipped "
                f"(train.nonfinite=skip, {self.skipped_steps} skipped so far)",
                file=sys.stderr,
                flush=True,
            )
        return True

    def metrics(self) -> dict[str, int]:
        """Fields for this step's metrics line: present only when the step was non-finite."""
        return {"nonfinite": 1, "skipped_steps": self.skipped_steps} if self.bad_step else {}

    def exit_if_stopped(self) -> None:
        """After a SIGTERM-triggered stop (its checkpoint saved): exit 143 like a process ended by SIGTERM."""
        if self.stop_requested:
            raise SystemExit(128 + signal.SIGTERM)
