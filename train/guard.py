"""The step guard on every rank: SIGTERM and non-finite steps.

- SIGTERM (Slurm's time limit, torchrun stopping its workers) only sets a flag. Ranks agree on it at the
  next step, finish that step, save a checkpoint and exit 143, so no rank stops inside a collective.
- A step whose gradient norm is NaN/Inf (a non-finite loss gives one too) is skipped or halts the run
  (train.nonfinite); the step is marked `nonfinite` in metrics.jsonl either way. The norm is global (identical
  on every rank), so ranks agree without a collective.

Host synchronisations: with a fused optimizer (the default on CUDA) the skip is decided on the device
(AdamW's `found_inf`, as torch's GradScaler drives it), and the host learns of skipped steps, and of SIGTERM
flags, only at logging steps, in the trainer's one packed collective: a SIGTERM is honoured at the first
logging step after it (every step with train.log_every=1), and train.nonfinite=halt stops there. Without a
fused optimizer (the CPU default) the step's flag is read on the host at once, which costs nothing on CPU.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

import torch
import torch.distributed as dist

from moeyard.profiling.sinks import MetricsLog
from moeyard.train.collectives import CollectiveLog


class NonFiniteError(ValueError):
    """A step produced NaN/Inf under train.nonfinite=halt (a ValueError: the CLI shows it as one line)."""


class StepGuard:
    """Per-rank SIGTERM flag and non-finite step policy; the trainer calls `allow_update` once per step."""

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
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._pending_bad: torch.Tensor | None = None
        self._ok: torch.Tensor | None = None
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

    def allow_update(self, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """After backward and clipping: False = skip the optimizer step (decided on the host)."""
        self._handle_sigterm()
        self.bad_step = False
        bad = ~torch.isfinite(grad_norm)
        if optimizer.defaults.get("fused"):
            # Decided on the device: the fused kernel leaves parameters, moments and step counts untouched.
            optimizer.found_inf = bad.float()
            self._ok = (~bad).float()
            self._pending_bad = bad.long() if self._pending_bad is None else self._pending_bad + bad
            return True
        self._ok = None
        if bool(bad):  # a host read: only without a fused optimizer (CPU, where it costs nothing)
            self._on_bad(grad_norm, count=1)
            return False
        return True

    def update_ok(self) -> torch.Tensor | None:
        """Device scalar, 1 where this step's update ran and 0 where the device skipped it; None when the
        host decided (allow_update's answer)."""
        return self._ok

    def pack(self, device: torch.device) -> torch.Tensor:
        """[non-finite steps since the last logging step, SIGTERM seen] for the logging step's collective."""
        pending = self._pending_bad if self._pending_bad is not None else torch.zeros((), device=device)
        return torch.stack([pending.to(device, torch.float64), torch.tensor(float(self._terminated), device=device)])

    def unpack(self, values: list[float], grad_norm: float, loss: float) -> None:
        """At a logging step, the packed flags summed over ranks: SIGTERM agreement and deferred skips."""
        self.stop_requested = self.stop_requested or values[1] > 0
        self._pending_bad = None
        if values[0] > 0:
            self._on_bad(grad_norm, count=round(values[0] / self.world), loss=loss)

    def _on_bad(self, grad_norm: torch.Tensor | float, count: int, loss: float = float("nan")) -> None:
        """Halts (train.nonfinite=halt) or counts the skipped steps and says so on rank 0."""
        step, norm = self.current_step(), float(grad_norm)
        self.bad_step = True
        if self.policy == "halt":
            self.log.write({"step": step, "loss": loss, "grad_norm": norm, "nonfinite": 1, "halted": 1})
            raise NonFiniteError(
                f"step {step}: non-finite loss or gradients (grad_norm={norm:.4g}; {count} such step(s) since "
                "the last logged one) (rule: train.nonfinite=halt stops the run; lower optim.lr, or set "
                "train.nonfinite=skip to drop such steps)"
            )
        self.skipped_steps += count
        if self.rank == 0:
            print(
                f"moeyard: step {step}: non-finite loss or gradients (grad_norm={norm:.4g}); update skipped "
                f"(train.nonfinite=skip, {self.skipped_steps} skipped so far)",
                file=sys.stderr,
                flush=True,
            )

    def metrics(self) -> dict[str, int]:
        """Fields for this step's metrics line: present only when the step was non-finite."""
        return {"nonfinite": 1, "skipped_steps": self.skipped_steps} if self.bad_step else {}

    def exit_if_stopped(self) -> None:
        """After a SIGTERM-triggered stop (its checkpoint saved): exit 143 like a process ended by SIGTERM."""
        if self.stop_requested:
            raise SystemExit(128 + signal.SIGTERM)
