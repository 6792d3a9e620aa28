"""Shared test fixtures: run the installed `moeyard` console script as a user would."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

MOEYARD = Path(sys.executable).with_name("moeyard")


@pytest.fixture(scope="session")
def moeyard(tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """Runs `moeyard ARGS...` in a subprocess (in a scratch cwd); returns the completed process."""
    cwd = tmp_path_factory.mktemp("cwd")

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(MOEYARD), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)

    return run
