"""Packaging: a plain (non-editable) install ships the five import packages, the console script and conf/.

Installs the project with `pip install --no-deps --target DIR .` and, from a directory outside the repo,
composes a config and checks that the YAML files came from DIR, not from the source tree.

    .venv/bin/pytest -q tests/unit/test_packaging.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_plain_install_ships_packages_and_configs(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        timeout=240,
        capture_output=True,
    )
    for package in ("moe", "parallel", "profiling", "train", "launch", "moeyard_conf"):
        assert (target / package / "__init__.py").is_file(), package
    assert (target / "moeyard_conf" / "model" / "mixtral_8x7b.yaml").is_file()
    assert (target / "bin" / "moeyard").is_file()
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from launch.config import compose, conf_dir;"
        "cfg = compose(['model=mixtral_8x7b']);"
        "print(conf_dir()); print(cfg.model.dim, cfg.moe.num_experts)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(target)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.split()
    assert Path(out[0]).resolve() == (target / "moeyard_conf").resolve()
    assert out[1:] == ["4096", "8"]
