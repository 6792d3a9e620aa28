"""launcher=mpi: mpiexec (the mpich wheel's, in the venv) starts 4 ranks that mpi4py introduces to each other.

Checks: 4 MPI ranks with parallel.ep=2 give the single-process losses, with rank 0 on the console and ranks 1-3
in logs/rank_N.log; the venv's mpiexec is found when PATH lacks it; a missing MPI launcher and a rank count that
cannot hold the layout are one-line errors before anything spawns.
Run: .venv/bin/pytest -q tests/launchers/test_launch_mpi.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moeyard.job.compose import compose
from moeyard.launch.cli import main as cli_main
from moeyard.launch.entry import rank_command
from moeyard.launch.mpi import find_mpirun, mpi_command
from tests.helpers import BASE, assert_same_losses, job_report, moeyard, reference_losses, run_losses


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_four_mpi_ranks_match_single_process(tmp_path, tmp_path_factory):
    want = reference_losses(tmp_path_factory)
    run_dir = tmp_path / "run"
    out = moeyard(*BASE, "launcher=mpi", "launcher.np=4", "parallel.ep=2", f"run.dir={run_dir}", timeout=240)
    assert out.returncode == 0, job_report(out, run_dir)
    assert_same_losses(run_losses(run_dir), want)
    assert out.stdout.count("[5/5]") == 1  # only rank 0 talks to the console
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank_1.log", "rank_2.log", "rank_3.log"]


def test_venv_mpiexec_is_found_without_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_mpirun("mpiexec") == str(Path(sys.executable).parent / "mpiexec")


def test_mpi_command_line():
    cfg = compose([*BASE, "launcher=mpi", "launcher.np=4", "parallel.ep=2", "launcher.mpi_args=[-bind-to,none]"])
    assert mpi_command(cfg)[1:] == ["-bind-to", "none", "-n", "4", *rank_command()]


def test_missing_mpirun_fails_before_spawning(tmp_path, capsys):
    args = [*BASE, "launcher=mpi", "launcher.np=2", "launcher.mpirun=no-such-mpiexec", f"run.dir={tmp_path}"]
    assert cli_main(["train", *args]) == 2
    assert capsys.readouterr().err == (
        f"moeyard: launcher.mpirun=no-such-mpiexec was not found on PATH or in {Path(sys.executable).parent} "
        "(install an MPI, e.g. `pip install mpich`, or name its mpiexec)\n"
    )


def test_rank_count_that_cannot_hold_the_layout_fails_before_spawning(tmp_path, capsys):
    args = [*BASE, "launcher=mpi", "launcher.np=3", "parallel.ep=2", f"run.dir={tmp_path / 'run'}"]
    assert cli_main(["train", *args]) == 2
    assert capsys.readouterr().err == (
        "moeyard: config error: parallel.ep=2 must divide dp x tp = 3x1 (experts fold into the data- and "
        "tensor-parallel ranks) (launcher.np=3)\n"
    )
    assert not (tmp_path / "run").exists()
