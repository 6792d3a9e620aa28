"""Launcher-test helpers (not a test module): run `moeyard train`, read losses, the one-process reference.

Every multi-rank launcher run is compared with one process training the same config (model=debug, 5 steps);
the reference is computed once per pytest session and cached under its base temp directory.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BASE = ["model=debug", "train.steps=5", "profiling.progress=false"]
REPO = Path(__file__).resolve().parent.parent


def local_rank_env(rank: int, world: int, port: int) -> None:
    """Environment of one gloo rank of a `world`-process group on this machine, one torch thread each."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moeyard_cmd(*overrides: str) -> list[str]:
    """`moeyard train ...` through the running (venv) python, so ranks use that python too."""
    return [sys.executable, "-m", "launch.cli", "train", *overrides]


def moeyard(*overrides: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        moeyard_cmd(*overrides),
        cwd=REPO,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses(run_dir: Path) -> list[float]:
    """The `loss` column of RUN_DIR/metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reference_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Losses of the single-process run of BASE (launcher=local, parallel=single), computed once."""
    run_dir = tmp_path_factory.getbasetemp() / "launch_reference"
    if not (run_dir / "metrics.jsonl").exists():
        out = moeyard(*BASE, f"run.dir={run_dir}", timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
    return losses(run_dir)


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == 5, (got, want)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert math.isclose(g, w, rel_tol=1e-5), f"step {step}: loss {g} != single-process {w}"
