"""How a rank's process ends: without the interpreter's finalization once its work is written, and with the
Python stack of every thread printed if a fatal signal ends it first.

Used by `python -m moeyard.launch.rank` (every launcher's rank) and, through `run_then_leave`, by every spawn of
ranks in the planner's measurements, the benchmarks and the tests.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn


def leave(status: int) -> NoReturn:
    """Ends this rank with `status`, skipping the interpreter's finalization.

    torch keeps a run's process groups (and their worker threads) alive past `destroy_process_group` when
    FSDP2 has held them. A worker that drops the last reference to a tensor while the interpreter finalizes
    must take the GIL, is stopped by Python, and the process aborts (SIGABRT, "terminate called without an
    active exception") after a run that succeeded. So this rank flushes what it wrote, finalizes MPI if it
    used it (mpi4py would do that at exit), and leaves through `os._exit`.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(status)


def report_fatal_signals() -> None:
    """Makes a crash in native code (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL: a kernel, a collective's
    thread, glibc finding its heap corrupted) print every thread's Python stack to this process's stderr
    before it dies. Without it a launcher reports only the signal, which names neither the phase of the
    step nor the call. Python's own handler (faulthandler): it writes from the signal handler without
    allocating. It is given descriptor 2 rather than `sys.stderr`, which a host may have swapped for an
    object without one."""
    faulthandler.enable(file=2, all_threads=True)


def run_then_leave(rank: int, fn: Callable[..., object], *args: object) -> NoReturn:
    """A torch.multiprocessing spawn target: `fn(rank, *args)`, then `leave(0)`. An exception in `fn`
    propagates as before (torch's spawn reports it); a rank that returned has written its results; a fatal
    signal prints the rank's Python stacks (`report_fatal_signals`)."""
    report_fatal_signals()
    fn(rank, *args)
    leave(0)
