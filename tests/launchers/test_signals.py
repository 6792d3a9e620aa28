"""Stop signals reach the whole job, and every stop is clean.

Checks: SIGTERM to the `moeyard` process alone, while a 2-rank torchrun job (launcher=local, nproc_per_node=2)
trains, stops both ranks after a step: the job exits 143, leaves a complete checkpoint of the last logged step,
names it in its last line, prints no traceback and leaves no process of the job running. SIGINT (Ctrl-C) to a
single-process job does the same with status 130 and no KeyboardInterrupt traceback. Every job is started in
a session of its own: a non-interactive shell's background job would ignore SIGINT.
Run: .venv/bin/pytest -q tests/launchers/test_signals.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from moeyard.parallel.checkpoint import checkpoint_root, complete_checkpoints, read_meta
from tests.helpers import REPO, moeyard_cmd

LONG_RUN = [
    "model=debug",
    "model.n_layers=2",
    "train.seq_len=32",
    "train.steps=100000",  # far more than the test waits for: the signal always lands mid-run
    "train.eval_every=0",
    "train.log_every=1",  # ranks agree on a stop at logging steps: every step here
    "profiling.progress=false",
    "checkpoint.enabled=true",
]


def job_processes(config: Path) -> list[int]:
    """Pids of the processes started for the run whose resolved config is `config` (ranks carry it in
    MOEYARD_CONFIG); a zombie shows an empty environment and does not count."""
    marker = f"MOEYARD_CONFIG={config}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def start(args: list[str], out: Path) -> subprocess.Popen:
    """`moeyard train ARGS` in a session of its own, output to OUT.{stdout,stderr}."""
    with out.with_suffix(".stdout").open("w") as stdout, out.with_suffix(".stderr").open("w") as stderr:
        return subprocess.Popen(moeyard_cmd(*args), cwd=REPO, stdout=stdout, stderr=stderr, start_new_session=True)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]


def wait_until_training(job: subprocess.Popen, run_dir: Path, out: Path, timeout: float) -> None:
    """Until rank 0 has logged two steps (so every rank is past its first step)."""
    deadline = time.monotonic() + timeout
    while len(logged_steps(run_dir)) < 2:
        assert job.poll() is None, out.with_suffix(".stderr").read_text()[-2000:]
        assert time.monotonic() < deadline, "the job did not start training in time"
        time.sleep(0.2)


def stop(job: subprocess.Popen, signum: int) -> int:
    os.kill(job.pid, signum)  # the CLI's pid only, as a process manager or `kill PID` does
    try:
        return job.wait(timeout=60)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


def assert_stopped_cleanly(run_dir: Path, out: Path, status: int, signum: int) -> None:
    """Exit 128+signal, a complete checkpoint of the last logged step named in the last line, no traceback."""
    err = out.with_suffix(".stderr").read_text()
    assert status == 128 + signum, err[-3000:]
    saved = complete_checkpoints(checkpoint_root(run_dir))
    assert len(saved) == 1, err[-3000:]
    path = saved[0][1]
    meta = read_meta(path, "test")  # every file it lists is there, at its recorded size
    assert meta["step"] == logged_steps(run_dir)[-1]  # the ranks finished the step they were in, then saved
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (
        f"moeyard: stopped by {name}; checkpoint saved at {path} (continue with train.resume=auto)"
    )
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_sigterm_to_the_cli_stops_every_torchrun_rank_with_a_checkpoint(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job"
    job = start([*LONG_RUN, "launcher=local", "launcher.nproc_per_node=2", f"run.dir={run_dir}"], out)
    try:
        wait_until_training(job, run_dir, out, timeout=90)
        ranks = job_processes(run_dir / "config.yaml")
        assert len(ranks) >= 3, ranks  # torchrun's agent and its two ranks
        status = stop(job, signal.SIGTERM)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert_stopped_cleanly(run_dir, out, status, signal.SIGTERM)
    assert job_processes(run_dir / "config.yaml") == []  # nothing of the job outlives `moeyard`


@pytest.mark.timeout(90)
def test_ctrl_c_on_one_process_saves_and_exits_130(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "job"
    job = start([*LONG_RUN, f"run.dir={run_dir}"], out)
    try:
        wait_until_training(job, run_dir, out, timeout=60)
        status = stop(job, signal.SIGINT)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert_stopped_cleanly(run_dir, out, status, signal.SIGINT)
