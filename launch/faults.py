"""Faults on every rank: SIGTERM, non-finite steps, collective diagnosis, and a test-only fault hook.

- SIGTERM (Slurm's time limit, torchrun stopping its workers) only sets a flag. Ranks agree on it at the
  next step, finish that step, save a checkpoint and exit 143, so no rank stops inside a collective.
- A step whose loss or gradient norm is NaN/Inf is skipped or halts the run (train.nonfinite); the step is
  marked `nonfinite` in metrics.jsonl either way.
- A ring buffer holds the last collectives this rank entered (step, op, group, shape, state). When a
  collective times out or anything raises, every rank prints it: the rank that diverged is the one whose
  last entry differs.
- MOEYARD_FAULT (tests only; see `fault_plan`) kills, signals, stalls or poisons a chosen rank at a chosen
  step, on the first attempt of a torchrun job only, so a restarted job runs clean.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

# The torch.distributed entry points the trainer, FSDP, DTensor redistribution and pipelining go through.
# Not isend/irecv: P2POp (pipelining) checks its op by identity against them; batch_isend_irecv covers those.
_OPS = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "batch_isend_irecv",
    "send",
    "recv",
    "gather",
    "scatter",
    "reduce",
    "gather_object",
    "scatter_object_list",
)
_FUNCOL_OPS = ("all_to_all_single_autograd",)


class NonFiniteError(ValueError):
    """A step produced NaN/Inf under train.nonfinite=halt (a ValueError: the CLI shows it as one line)."""


class CollectiveLog:
    """The last `size` collectives this process entered, fed by thin wrappers around torch.distributed."""

    def __init__(self, size: int = 24) -> None:
        self.entries: deque[list] = deque(maxlen=size)
        self.step: Callable[[], object] = lambda: "init"
        self.names: dict[int, str] = {}
        self._originals: dict[tuple[object, str], Callable] = {}

    def install(self) -> None:
        if self._originals:
            return
        for module, ops in ((dist, _OPS), (funcol, _FUNCOL_OPS)):
            for op in ops:
                fn = getattr(module, op, None)
                if fn is not None:
                    self._originals[(module, op)] = fn
                    setattr(module, op, self._wrap(op, fn))

    def uninstall(self) -> None:
        for (module, op), fn in self._originals.items():
            setattr(module, op, fn)
        self._originals.clear()

    def _wrap(self, op: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def recorded(*args, **kwargs):
            if torch.compiler.is_compiling():  # inside a compiled graph: no Python side effects
                return fn(*args, **kwargs)
            entry = [
                self.step(),
                op,
                self._group(args, kwargs),
                _shape(args),
                "in progress",
                time.monotonic(),
            ]
            self.entries.append(entry)
            try:
                out = fn(*args, **kwargs)
            except BaseException:
                entry[4] = "raised"
                raise
            entry[4] = "ok"
            return out

        return recorded

    def _group(self, args: tuple, kwargs: dict) -> str:
        group = kwargs.get("group") or next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
        group = group or dist.GroupMember.WORLD
        if id(group) not in self.names:
            try:
                ranks = dist.get_process_group_ranks(group)
            except (RuntimeError, ValueError):
                return type(group).__name__
            self.names[id(group)] = "world" if group is dist.GroupMember.WORLD else f"ranks{ranks}"
        return self.names[id(group)]

    def name_groups(self, groups: dict[str, dist.ProcessGroup | None]) -> None:
        """Shows the mesh axes (dp, ep, ...) of each group with its ranks; a mesh axis may be the world."""
        self.names.clear()
        axes: dict[int, tuple[dist.ProcessGroup, list[str]]] = {}
        for axis, group in groups.items():
            if group is not None:
                axes.setdefault(id(group), (group, []))[1].append(axis)
        for key, (group, names) in axes.items():
            self.names[key] = f"{'/'.join(names)}{dist.get_process_group_ranks(group)}"

    def last(self) -> str:
        """The newest entry, as one line."""
        if not self.entries:
            return "none"
        step, op, group, shape, state, _ = self.entries[-1]
        return f"step {step} {op} group={group} shape={shape} {state}"

    def report(self, rank: int) -> str:
        now = time.monotonic()
        lines = [f"moeyard rank {rank}: last {len(self.entries)} collectives entered (oldest first):"]
        for step, op, group, shape, state, t0 in self.entries:
            waited = f" for {now - t0:.1f} s" if state != "ok" else ""
            lines.append(f"  rank {rank} step {step} {op} group={group} shape={shape} {state}{waited}")
        return "\n".join(lines)


def _shape(args: tuple) -> tuple | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return tuple(a.shape)
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            return tuple(a[0].shape)
    return None


COLLECTIVES = CollectiveLog()
"""This process's log: one per process, as torch.distributed's functions are."""


@contextmanager
def report_collectives_on_error() -> Iterator[CollectiveLog]:
    """Records collectives inside the block; if it raises, prints this rank's log to stderr and re-raises."""
    COLLECTIVES.install()
    COLLECTIVES.step = lambda: "init"
    try:
        yield COLLECTIVES
    except (SystemExit, NonFiniteError, ValueError):  # a clean exit, or an error that explains itself
        raise
    except BaseException:
        if COLLECTIVES.entries:
            rank = dist.get_rank() if dist.is_initialized() else 0
            print(COLLECTIVES.report(rank), file=sys.stderr, flush=True)
        raise
    finally:
        COLLECTIVES.uninstall()


def apply_timeouts(groups: dict[str, dist.ProcessGroup | None], seconds: int) -> None:
    """launcher.timeout_s for the mesh's groups too (new groups otherwise get torch's 30 min default)."""
    for group in groups.values():
        if group is not None:
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)


# --- test-only fault injection ------------------------------------------------------------------------------


def fault_plan(env: str | None = None) -> list[tuple[str, int, int | None]]:
    """Parses MOEYARD_FAULT="kind@step[@rank],..." (no rank: every rank).

    Kinds: kill (SIGKILL), term (SIGTERM to itself), raise (RuntimeError), stall (sleep 3x launcher.timeout_s)
    and nan (a NaN gradient norm) while running step `step` (1-based, as in metrics), after backward;
    save_kill: SIGKILL while saving the checkpoint of step `step`, after its files are written and before
    it is marked COMPLETE. Only on the first attempt of a job (TORCHELASTIC_RESTART_COUNT unset or 0).
    """
    env = os.environ.get("MOEYARD_FAULT", "") if env is None else env
    if not env or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return []
    plan = []
    for item in env.split(","):
        kind, step, *rank = item.split("@")
        plan.append((kind, int(step), int(rank[0]) if rank else None))
    return plan


class StepGuard:
    """Per-rank SIGTERM flag, non-finite step policy and fault hook; the trainer calls it once per step."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.rank = trainer.rank
        self.policy = trainer.cfg.train.nonfinite
        self.timeout_s = trainer.cfg.launcher.timeout_s
        self.stop_requested = False
        self.skipped_steps = 0
        self.bad_step = False
        self._terminated = False
        self.plan = fault_plan()
        groups = vars(trainer.pm.groups)
        COLLECTIVES.name_groups(groups)
        COLLECTIVES.step = lambda: trainer.step + 1
        if dist.is_initialized():
            apply_timeouts(groups, self.timeout_s)
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
            f"moeyard rank {self.rank}: SIGTERM in step {self.trainer.step + 1} (last collective entered: "
            f"{COLLECTIVES.last()}); finishing the step, then saving and exiting\n"
        )
        os.write(2, line.encode())

    def close(self) -> None:
        """Gives SIGTERM back its previous handler."""
        if self._handling:
            signal.signal(signal.SIGTERM, self._previous)
            self._handling = False

    def fault(self, point: str, step: int) -> None:
        """Runs the planned fault for (point, step) on this rank, if any."""
        for kind, at, rank in self.plan:
            if at != step or rank not in (None, self.rank) or (kind == "save_kill") != (point == "save"):
                continue
            if kind in ("kill", "save_kill"):
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            elif kind == "raise":
                raise RuntimeError(f"MOEYARD_FAULT: raise at step {step} on rank {self.rank}")
            elif kind == "stall":
                time.sleep(3 * self.timeout_s)

    def skip_step(self, losses: list[torch.Tensor], grad_norm: torch.Tensor) -> bool:
        """After backward: agrees on non-finite values and SIGTERM across ranks; True = skip the update."""
        step = self.trainer.step + 1
        self._handle_sigterm()
        self.fault("step", step)
        norm = float("nan") if any(k == "nan" and s == step for k, s, _ in self.plan) else float(grad_norm)
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
            self.trainer.log.write({"step": step, "loss": loss, "grad_norm": norm, "nonfinite": 1, "halted": 1})
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
