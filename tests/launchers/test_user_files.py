"""A user's own files cannot stand in for MoEyard's modules.

Launches a 2-rank torchrun job with the `moeyard` console script from a directory that holds `train.py`,
`launch.py`, `moe.py`, `profiling.py`, a `parallel/` package and even a `moeyard/` package, each raising
when imported. The six generic top-level names MoEyard once installed let the first ones stand in for its
own; the last one would, were the working directory first on a rank's sys.path (ranks start with
`python -P`). The job trains and writes its metrics. Run: .venv/bin/pytest -q tests/launchers/test_user_files.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers import BASE, MOEYARD

TRAP = "raise ImportError('a user file was imported in place of MoEyard: {}')\n"


def plant_user_files(where: Path) -> None:
    for name in ("train.py", "launch.py", "moe.py", "profiling.py", "job.py", "plan.py"):
        (where / name).write_text(TRAP.format(name))
    for package in ("parallel", "moeyard"):
        (where / package).mkdir()
        (where / package / "__init__.py").write_text(TRAP.format(f"{package}/"))


@pytest.mark.multiproc
@pytest.mark.timeout(240)
def test_launching_beside_same_named_user_files_trains(tmp_path):
    plant_user_files(tmp_path)
    run_dir = tmp_path / "run"
    args = [*BASE, "launcher=local", "launcher.nproc_per_node=2", "parallel.ep=2", f"run.dir={run_dir}"]
    done = subprocess.run([str(MOEYARD), "train", *args], cwd=tmp_path, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a user file was imported" not in done.stdout + done.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 5
