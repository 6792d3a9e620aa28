"""Packaging: the wheel adds exactly one import package, `moeyard`, plus the console script and conf/.

Builds the wheel once, installs it (no dependencies) into a fresh venv and compares site-packages before and
after; then, from a directory outside the repo, composes a config from a `--target` install and checks that
the YAML files came from there, not from the source tree.

    .venv/bin/pytest -q tests/unit/test_packaging.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip", "-q"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True,
        timeout=240,
        capture_output=True,
    )
    return next(out.glob("moeyard-*.whl"))


def site_packages(venv: Path) -> Path:
    return next(venv.glob("lib/python*/site-packages"))


@pytest.mark.timeout(300)
def test_the_wheel_adds_only_moeyard_to_a_fresh_venv(tmp_path, wheel):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, capture_output=True)
    before = {p.name for p in site_packages(venv).iterdir()}
    python = venv / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        timeout=120,
        capture_output=True,
    )
    added = {p.name for p in site_packages(venv).iterdir()} - before
    assert {name for name in added if not name.endswith(".dist-info")} == {"moeyard"}
    assert not (site_packages(venv) / "moeyard" / "__init__.py").exists()  # a namespace package: one name
    assert {p.name for p in (site_packages(venv) / "moeyard").iterdir()} >= {
        "moe", "parallel", "profiling", "train", "interop", "job", "plan", "launch", "conf"
    }  # fmt: skip
    assert (venv / "bin" / "moeyard").is_file()


@pytest.mark.timeout(300)
def test_configs_come_from_the_installed_package(tmp_path, wheel):
    target = tmp_path / "site"
    subprocess.run(
        [*PIP, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        timeout=240,
        capture_output=True,
    )
    assert (target / "moeyard" / "conf" / "experiment" / "mixtral_8x7b_h100.yaml").is_file()
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from moeyard.job.compose import compose, conf_dir;"
        "cfg = compose(['model=mixtral_8x7b']);"
        "print(conf_dir()); print(cfg.model.dim, cfg.moe.num_experts)"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", probe, str(target)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.split()
    assert Path(out[0]).resolve() == (target / "moeyard" / "conf").resolve()
    assert out[1:] == ["4096", "8"]
