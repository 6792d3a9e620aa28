"""A rank that dies by a fatal signal names where it was: every thread's Python stack on its stderr."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from torch.multiprocessing import ProcessExitedException

from moeyard.train.spawn import spawn_ranks

CRASHING_RANK = """
import io, os, sys
from moeyard.train.process import report_fatal_signals

if {swap_stderr}:
    sys.stderr = io.StringIO()  # as a host that captures sys.stderr leaves it: no file descriptor

def step_that_crashes():
    os.abort()  # what glibc does on finding its heap corrupted

report_fatal_signals()
step_that_crashes()
"""


@pytest.mark.parametrize("swap_stderr", [False, True], ids=["stderr", "sys.stderr-swapped"])
def test_an_aborting_process_prints_its_python_stack(swap_stderr):
    script = CRASHING_RANK.format(swap_stderr=swap_stderr)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGABRT  # the signal still ends it, as the launcher expects
    assert "Fatal Python error: Aborted" in done.stderr
    assert "step_that_crashes" in done.stderr


def _aborting_rank(rank: int) -> None:
    os.abort()


@pytest.mark.timeout(120)
def test_a_spawned_rank_that_aborts_names_its_function(capfd):
    with pytest.raises(ProcessExitedException, match="SIGABRT"):
        spawn_ranks(_aborting_rank, (), world=1, timeout_s=60)
    assert "_aborting_rank" in capfd.readouterr().err
