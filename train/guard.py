"""The step guard on every rank: stop signals and non-finite steps.

- SIGTERM (Slurm's time limit, `moeyard` forwarding its own) and SIGINT (Ctrl-C, which means the same) only set
  a flag. Ranks agree on it at the next step, finish that step, save a checkpoint and exit 128+signal (143,
  130), so no rank stops inside a collective. Before the first step there is nothing to save: a stop signal
  then ends the process at once, as `Stopped` (`exit_on_stop_signals`).
- A step whose gradient norm is NaN/Inf (a non-finite loss gives one too) is skipped or halts the run
  (train.nonfinite); the step is marked `nonfinite` in metrics.jsonl either way. The norm is global (identical
  on every rank), so ranks agree without a collective.

Host synchronisations: with a fused optimizer (the default on CUDA) the skip is decided on the device
(AdamW's `found_inf`, as torch's GradScaler drives it), and the host learns of skipped steps, and of stop
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

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    """The exit of a process stopped by `signum`: status 128+signum, like a process the signal ended."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def exit_on_stop_signals() -> dict[int, object]:
    """SIGTERM and SIGINT raise `Stopped` (no KeyboardInterrupt traceback) until the step guard takes over;
    returns the handlers they had (none off the main thread, where Python delivers no signals)."""

    def stop(signum, frame) -> None:
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}


class NonFiniteError(ValueError):
    """A step produced NaN/Inf under train.nonfinite=halt (a ValueError: the CLI shows it as one line)."""


class StepGuard:
    """Per-rank stop-signal flag and non-finite step policy; the trainer calls `allow_update` once per step."""

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
        self._signal: int | None = None  # the first stop signal this rank received
        self._previous: dict[int, object] = {}

    def _handle_signals(self) -> None:
        """From the first step to the end of fit (a trainer that never trains keeps the previous handlers)."""
        if not self._previous and threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        self._signal = self._signal or signum
        # One line, so a rank stuck outside collectives still says where it was; os.write because a
        # handler may interrupt a print in progress.
        line = (
            f"moeyard rank {self.rank}: {signal.Signals(signum).name} in step {self.current_step()} (last "
            f"collective entered: {self.collectives.last()}); finishing the step, then saving and exiting\n"
        )
        os.write(2, line.encode())

    def close(self) -> None:
        """Gives the stop signals back their previous handlers."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def allow_update(self, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """After backward and clipping: False = skip the optimizer step (decided on the host)."""
        self._handle_signals()
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
        """[non-finite steps since the last logging step, stop signal seen] for the logging step's collective."""
        pending = self._pending_bad if self._pending_bad is not None else torch.zeros((), device=device)
        # torch.full, not torch.tensor(value, device=...): that one copies from pageable memory and waits.
        stop = torch.full((), float(self._signal is not None), dtype=torch.float64, device=device)
        return torch.stack([pending.to(device, torch.float64), stop])

    def unpack(self, values: list[float], grad_norm: float, loss: float) -> None:
        """At a logging step, the packed flags summed over ranks: stop agreement and deferred skips."""
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
        """After a stop (its checkpoint saved): exit 128+signal like a process the signal ended; a rank that
        stopped because another was signalled exits as if SIGTERM'd."""
        if self.stop_requested:
            raise Stopped(self._signal or signal.SIGTERM)
