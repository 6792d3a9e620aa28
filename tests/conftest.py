"""Shared test fixtures: one torch thread per test module, and the installed `moeyard` console script.

Every test runs on CPU and gloo, as in CI, even where CUDA exists: this hides the GPUs before anything starts
CUDA (train.device=auto would pick one, and each rank of a multi-rank test would claim GPU `rank`), unless
the run selects the `gpu` tests alone (`pytest -m gpu`). Tests marked `gpu` that train run the Trainer in a
subprocess that sees the machine's GPUs (`host_gpu_env`), so they run in either case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

MOEYARD = Path(sys.executable).with_name("moeyard")
_HOST_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("markexpr") != "gpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session")
def host_gpu_env() -> dict[str, str]:
    """This process's environment with the GPUs it was started with visible (for a `gpu` test's subprocess)."""
    env = dict(os.environ)
    if _HOST_GPUS is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = _HOST_GPUS
    return env


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
