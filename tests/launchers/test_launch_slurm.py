"""launcher=slurm against a real two-node Slurm on this machine (tests/slurm_cluster.py starts and stops it).

Checks: the sbatch script rendered from the config (dry run); a 2-node x 2-task job (srun, ep=2) and a 2-node
torchrun-per-node job train like one process; a failing job returns its status with the log tail; the first
node's unresolvable name falls back to its NodeAddr; SLURM_* become the torch rank variables; a rank that cannot
reach its master reports a one-line rendezvous failure; missing sbatch and impossible requests fail before
anything is submitted. Needs root + slurm-wlm + munge (`.ci/system-deps.sh`).
Run: .venv/bin/pytest -q tests/launchers/test_launch_slurm.py
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest

from moeyard.job.compose import compose, write_resolved
from moeyard.launch.cli import main as cli_main
from moeyard.launch.slurm import exit_status, job_state, node_address, rank_env_from_slurm
from tests.helpers import BASE, REPO, assert_same_losses, free_port, job_report, moeyard, reference_losses, run_losses
from tests.launchers.slurm_cluster import SlurmCluster

JOB_LINE = re.compile(r"^submitted slurm job (\d+); run dir (\S+); output (\S+)$", re.M)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    procs = list(cluster.procs)
    cluster.stop()
    assert all(p.poll() is not None for p in procs)


def test_dry_run_prints_the_sbatch_script(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = [
        *BASE,
        "launcher=slurm",
        "launcher.nodes=4",
        "launcher.tasks_per_node=8",
        "launcher.gpus_per_node=8",
        "launcher.partition=gpu",
        "launcher.account=proj",
        "launcher.time=02:00:00",
        "launcher.constraint=h100",
        "launcher.exclusive=true",
        "launcher.setup=[module load cuda,source /opt/venv/bin/activate]",
        "launcher.dry_run=true",
        "parallel.ep=8",
        "train.batch_size=64",
        f"run.dir={run_dir}",
    ]
    assert cli_main(["train", *args]) == 0
    script = capsys.readouterr().out
    assert script == (run_dir / "job.sbatch").read_text()
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --time=02:00:00",
        "#SBATCH --constraint=h100",
        "#SBATCH --exclusive",
        "#SBATCH --signal=TERM@120",
        f"#SBATCH --chdir={os.getcwd()}",
        f"#SBATCH --output={run_dir}/logs/slurm-%j.out",
        "module load cuda",
        "source /opt/venv/bin/activate",
        f"export MOEYARD_CONFIG={run_dir}/config.yaml",
        f'eval "$({sys.executable} -m moeyard.launch.slurm master)"',
        f"srun --kill-on-bad-exit=1 {sys.executable} -P -m moeyard.launch.rank",
    ]:
        assert line in script.splitlines(), line
    assert script.index("module load cuda") < script.index("srun")


def test_dry_run_torchrun_mode_starts_one_agent_per_node(tmp_path, capsys):
    args = [
        *BASE,
        "launcher=slurm",
        "launcher.nodes=2",
        "launcher.tasks_per_node=4",
        "launcher.mode=torchrun",
        "launcher.dry_run=true",
        "train.batch_size=16",
        "launcher.timeout_s=60",
        f"run.dir={tmp_path / 'run'}",
    ]
    assert cli_main(["train", *args]) == 0
    script = capsys.readouterr().out
    srun = " ".join(script[script.index("srun ") :].replace("\\\n", " ").split())
    assert srun == (
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 --ntasks=$SLURM_JOB_NUM_NODES {sys.executable} "
        "-m torch.distributed.run --nnodes=$SLURM_JOB_NUM_NODES --nproc-per-node=4 --max-restarts=0 "
        "--rdzv-backend=c10d --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT --rdzv-id=$SLURM_JOB_ID "
        f"--rdzv-conf=join_timeout=60 --no-python {sys.executable} -P -m moeyard.launch.rank"
    )


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_two_node_job_matches_single_process(cluster, tmp_path, tmp_path_factory):
    want = reference_losses(tmp_path_factory)
    run_dir = tmp_path / "run"
    out = moeyard(
        "launcher=slurm",
        "launcher.nodes=2",
        "launcher.tasks_per_node=2",
        "launcher.wait=true",
        "parallel.ep=2",
        *BASE,
        f"run.dir={run_dir}",
        timeout=360,
        env=cluster.env,
    )
    assert out.returncode == 0, job_report(out, run_dir)
    job = JOB_LINE.search(out.stdout)
    assert job and job.group(2) == str(run_dir), out.stdout[:500]
    assert "[5/5]" in out.stdout  # rank 0's console, followed from the job's output file
    assert_same_losses(run_losses(run_dir), want)
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == ["rank_1.log", "rank_2.log", "rank_3.log", f"slurm-{job.group(1)}.out"]


@pytest.mark.multiproc
@pytest.mark.timeout(400)
def test_torchrun_per_node_job_matches_single_process(cluster, tmp_path, tmp_path_factory):
    want = reference_losses(tmp_path_factory)
    run_dir = tmp_path / "run"
    out = moeyard(
        "launcher=slurm",
        "launcher.mode=torchrun",
        "launcher.nodes=2",
        "launcher.tasks_per_node=1",
        "launcher.wait=true",
        "parallel.ep=2",
        *BASE,
        f"run.dir={run_dir}",
        timeout=360,
        env=cluster.env,
    )
    assert out.returncode == 0, job_report(out, run_dir)
    assert_same_losses(run_losses(run_dir), want)
    assert (run_dir / "logs" / "rank_1.log").exists()


@pytest.mark.timeout(120)
def test_failing_job_returns_its_status_and_log_tail(cluster, tmp_path):
    out = moeyard(
        *BASE,
        "launcher=slurm",
        "launcher.nodes=2",
        "launcher.wait=true",
        "launcher.setup=['echo setup-went-wrong; exit 3']",
        f"run.dir={tmp_path / 'run'}",
        timeout=100,
        env=cluster.env,
    )
    assert out.returncode == 3
    job = JOB_LINE.search(out.stdout).group(1)
    assert out.stderr.startswith(f"moeyard: slurm job {job} ended FAILED with exit status 3; last lines of ")
    assert out.stderr.strip().splitlines()[-1] == "setup-went-wrong"


@pytest.mark.timeout(120)
def test_submit_without_wait_prints_job_and_returns(cluster, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    out = moeyard(
        *BASE, "launcher=slurm", "launcher.setup=['exit 0']", f"run.dir={run_dir}", timeout=60, env=cluster.env
    )
    assert out.returncode == 0, out.stderr
    job = JOB_LINE.search(out.stdout)
    assert job.group(2) == str(run_dir) and job.group(3) == f"{run_dir}/logs/slurm-{job.group(1)}.out"
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    deadline = time.monotonic() + 60
    while job_state(job.group(1))[0] != "COMPLETED":
        assert time.monotonic() < deadline, job_state(job.group(1))
        time.sleep(0.5)


def test_unresolvable_node_name_falls_back_to_node_addr(cluster, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    with pytest.raises(OSError):
        socket.gethostbyname("n2")
    assert node_address("n2") == "127.0.0.1"
    assert node_address("localhost") == "127.0.0.1"


def test_srun_task_environment_becomes_torch_ranks():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29400",
    }
    assert rank_env_from_slurm(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    with pytest.raises(RuntimeError, match="no SLURM_PROCID"):
        rank_env_from_slurm({})


def test_exit_status_from_slurm_exit_code():
    assert exit_status("COMPLETED", "0:0") == 0
    assert exit_status("FAILED", "3:0") == 3
    assert exit_status("CANCELLED", "0:9") == 137
    assert exit_status("TIMEOUT", "0:0") == 1


@pytest.mark.timeout(120)
def test_rank_that_cannot_reach_its_master_reports_rendezvous_failure(tmp_path):
    """An srun task whose master never comes up: one line on the console, the traceback in its log."""
    run_dir = tmp_path / "run"
    args = ["launcher=slurm", "launcher.tasks_per_node=2", "launcher.timeout_s=2", f"run.dir={run_dir}"]
    config_path = write_resolved(compose([*BASE, *args]), run_dir)
    port = free_port()
    env = {
        **os.environ,
        "MOEYARD_CONFIG": str(config_path),
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    out = subprocess.run(
        [sys.executable, "-m", "moeyard.launch.rank"], cwd=REPO, env=env, capture_output=True, text=True, timeout=100
    )
    assert out.returncode == 1
    assert out.stderr.startswith(
        f"moeyard rank 1 failed: RuntimeError: rendezvous of 2 ranks at 127.0.0.1:{port} "
        "failed (launcher.timeout_s=2): "
    )
    assert out.stderr.strip().endswith(f"(log: {run_dir}/logs/rank_1.log)")
    assert "Traceback" in (run_dir / "logs" / "rank_1.log").read_text()


def test_missing_sbatch_fails_before_submitting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm commands here
    assert cli_main(["train", *BASE, "launcher=slurm", f"run.dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == (
        "moeyard: launcher=slurm needs `sbatch` on PATH (not found): run on a Slurm login node, "
        "or set launcher.dry_run=true to only print the script\n"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["launcher.nodes=2", "launcher.tasks_per_node=2", "parallel.dp=2"],
            "parallel.pp*dp*tp=1*2*1 must equal the world size 4 (launcher.nodes=2 x launcher.tasks_per_node=2)",
        ),
        (
            ["launcher.nodes=2", "launcher.tasks_per_node=1", "parallel.tp=2"],
            "parallel.tp=2 must divide launcher.tasks_per_node=1 (a tensor-parallel group stays inside one node)",
        ),
        (
            ["launcher.tasks_per_node=8", "launcher.gpus_per_node=4", "parallel.ep=8"],
            "launcher.tasks_per_node=8 must be <= launcher.gpus_per_node=4 (one GPU per rank)",
        ),
        (
            ["launcher.nodes=3", "launcher.tasks_per_node=1", "parallel.ep=2"],
            "parallel.ep=2 must divide dp x tp = 3x1 (experts fold into the data- and tensor-parallel ranks) "
            "(launcher.nodes=3 x launcher.tasks_per_node=1)",
        ),
    ],
)
def test_requests_that_cannot_hold_the_layout_fail_before_submitting(tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    assert cli_main(["train", *BASE, "launcher=slurm", *overrides, f"run.dir={run_dir}"]) == 2
    assert capsys.readouterr().err == f"moeyard: config error: {message}\n"
    assert not run_dir.exists()
