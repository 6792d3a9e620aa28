"""A log of the last collectives each rank entered, printed when a run fails.

When a collective times out or anything raises, every rank prints its log: the rank that diverged is the
one whose last entry differs.
"""

from __future__ import annotations

import functools
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from moeyard.parallel.compat import NEWER_COLLECTIVES

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
    *NEWER_COLLECTIVES,
)
_FUNCOL_OPS = ("all_to_all_single_autograd",)


class CollectiveLog:
    """The last `size` collectives this process entered, fed by thin wrappers around torch.distributed."""

    def __init__(self, size: int = 24) -> None:
        self.entries: deque[list] = deque(maxlen=size)
        self.step: Callable[[], object] = lambda: "init"
        self.names: dict[int, str] = {}
        self._originals: dict[tuple[object, str], Callable] = {}

    def install(self) -> None:
        """Wraps torch.distributed's collective functions so each call is logged here.

        The wrappers are process-wide because torch.distributed's functions are module attributes that
        FSDP, DTensor and pipelining call directly; the log object itself belongs to one run (see
        `recording`). torch's flight recorder would serve on NCCL, but on gloo it does not record the
        step and mesh axis we print, so the log is kept by hand.
        """
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


@contextmanager
def recording(log: CollectiveLog, quiet: tuple[type[BaseException], ...] = ()) -> Iterator[CollectiveLog]:
    """Records collectives inside the block; if it raises (other than `quiet` errors, which explain
    themselves), prints this rank's log to stderr and re-raises."""
    log.install()
    log.step = lambda: "init"
    try:
        yield log
    except (SystemExit, *quiet):
        raise
    except BaseException:
        if log.entries:
            rank = dist.get_rank() if dist.is_initialized() else 0
            print(log.report(rank), file=sys.stderr, flush=True)
        raise
    finally:
        log.uninstall()


def apply_timeouts(groups: dict[str, dist.ProcessGroup | None], seconds: int) -> None:
    """launcher.timeout_s for the mesh's groups too (new groups otherwise get torch's 30 min default)."""
    for group in groups.values():
        if group is not None:
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=seconds), group)
