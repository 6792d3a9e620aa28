"""Shared test fixtures: one torch thread per test module, and the installed `moeyard` console script."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

MOEYARD = Path(sys.executable).with_name("moeyard")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and spinning threads stall a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def moeyard(tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """Runs `moeyard ARGS...` in a subprocess (in a scratch cwd); returns the completed process."""
    cwd = tmp_path_factory.mktemp("cwd")

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(MOEYARD), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)

    return run
