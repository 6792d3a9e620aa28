"""launcher=torchrun (and local): two torchrun agents on this machine act as two nodes, like one process.

Checks: 2 agents x 2 ranks (parallel.ep=2) give the single-process losses; rank 0 alone writes metrics.jsonl
and the console while ranks 1-3 write logs/rank_N.log; a missing agent is a one-line rendezvous timeout; a
failing rank is named in one line with its log; layout/launcher mismatches are one-line errors before anything
spawns. Run: .venv/bin/pytest -q tests/launchers/test_launch_torchrun.py
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from moeyard.job.compose import compose, write_resolved
from moeyard.launch.cli import main as cli_main
from moeyard.launch.launchers import launch
from tests.helpers import (
    BASE,
    REPO,
    assert_same_losses,
    free_port,
    moeyard_cmd,
    reference_losses,
    run_losses,
)


def start_agent(args: list[str], out: Path) -> subprocess.Popen:
    """One `moeyard train` (a torchrun agent); its stdout and stderr go to out.{stdout,stderr}."""
    with out.with_suffix(".stdout").open("w") as stdout, out.with_suffix(".stderr").open("w") as stderr:
        return subprocess.Popen(moeyard_cmd(*args), cwd=REPO, stdout=stdout, stderr=stderr)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_two_agents_as_two_nodes_match_single_process(tmp_path, tmp_path_factory):
    want = reference_losses(tmp_path_factory)
    run_dir, port = tmp_path / "run", free_port()
    args = [
        *BASE,
        "launcher=torchrun",
        "launcher.nnodes=2",
        "launcher.nproc_per_node=2",
        "parallel.ep=2",
        f"launcher.rdzv_endpoint=127.0.0.1:{port}",
        "launcher.single_host=true",  # both "nodes" are this machine: loopback is reachable
        "launcher.timeout_s=120",
        f"run.dir={run_dir}",
    ]
    # "Node 1" starts first and waits for node 0, which hosts the rendezvous store; same command, same run dir.
    agents = [start_agent([*args, "launcher.node_rank=1"], tmp_path / "node1")]
    try:
        time.sleep(1)
        agents.append(start_agent(args, tmp_path / "node0"))
        statuses = [agent.wait(timeout=240) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    errs = {f.name: f.read_text()[-2000:] for f in tmp_path.glob("node*.stderr")}
    assert statuses == [0, 0], errs
    assert_same_losses(run_losses(run_dir), want)
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank_1.log", "rank_2.log", "rank_3.log"]
    consoles = [f.read_text() for f in tmp_path.glob("node*.stdout")]
    assert sum("[5/5]" in out for out in consoles) == 1  # exactly one agent runs rank 0, the console


@pytest.mark.multiproc
@pytest.mark.timeout(120)
def test_missing_agent_is_a_one_line_rendezvous_timeout(tmp_path):
    port = free_port()
    args = [
        *BASE,
        "launcher=torchrun",
        "launcher.nnodes=2",
        "launcher.nproc_per_node=1",
        "launcher.timeout_s=2",
        f"launcher.rdzv_endpoint=127.0.0.1:{port}",
        "launcher.single_host=true",
        f"run.dir={tmp_path / 'run'}",
    ]
    out = subprocess.run(moeyard_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=100)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        f"moeyard: torchrun rendezvous at 127.0.0.1:{port} timed out after launcher.timeout_s=2: "
        "not all launcher.nnodes=2 agents joined (start one per node with the same run.dir)"
    )


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_failing_ranks_are_named_with_their_logs(tmp_path, capsys):
    """Ranks read the run dir's config.yaml; one edited to an impossible layout fails on every rank."""
    run_dir = tmp_path / "run"
    cfg = compose([*BASE, "launcher.nproc_per_node=2", "parallel.ep=2", f"run.dir={run_dir}"])
    path = write_resolved(cfg, run_dir)
    path.write_text(path.read_text().replace("ep: 2", "ep: 3"))
    assert launch(cfg, path) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("moeyard: torchrun exited with status 1: moeyard rank ")
    # Ranks do not validate again: they derive ParallelDims from the file, which refuses the impossible layout.
    assert "ValueError: parallel.ep=3 must divide dp x tp = 2x1" in last
    assert "ValueError: parallel.ep=3" in (run_dir / "logs" / "rank_1.log").read_text()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["launcher.nnodes=2", "launcher.single_host=true", "launcher.nproc_per_node=1", "parallel.dp=4"],
            "parallel.pp*dp*tp=1*4*1 must equal the world size 2 (launcher.nnodes=2 x launcher.nproc_per_node=1)",
        ),
        (
            ["launcher.nnodes=2", "launcher.single_host=true", "launcher.nproc_per_node=2", "parallel.tp=4"],
            "parallel.tp=4 must divide launcher.nproc_per_node=2 (a tensor-parallel group stays inside one node)",
        ),
        (["launcher.nnodes=2", "launcher.node_rank=2"], "launcher.node_rank=2 must be in [0, 2)"),
        (["launcher.rdzv_endpoint=localhost"], "launcher.rdzv_endpoint=localhost must be host:port"),
        (
            ["launcher.nnodes=2", "launcher.rdzv_endpoint=localhost:29500"],
            "launcher.rdzv_endpoint=localhost:29500 is a loopback address, which other nodes cannot reach (rule: "
            "with launcher.nnodes=2 give node 0's address; launcher.single_host=true if every agent runs on this "
            "host)",
        ),
        (["launcher.timeout_s=0"], "launcher.timeout_s=0 must be >= 1"),
    ],
)
def test_bad_requests_fail_before_spawning(tmp_path, capsys, overrides, message):
    run_dir = tmp_path / "run"
    given = any(o.startswith("launcher.rdzv_endpoint=") for o in overrides)
    endpoint = [] if given else [f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}"]  # nnodes > 1 needs one
    assert cli_main(["train", *BASE, "launcher=torchrun", *endpoint, *overrides, f"run.dir={run_dir}"]) == 2
    assert capsys.readouterr().err == f"moeyard: config error: {message}\n"
    assert not run_dir.exists()  # nothing written, nothing started


def test_multinode_torchrun_needs_an_explicit_run_dir(capsys):
    args = ["train", *BASE, "launcher=torchrun", "launcher.nnodes=2", "launcher.single_host=true"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeyard: config error: run.dir=None must be given for launcher.nnodes=2 (rule: ")


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_two_single_node_jobs_run_side_by_side(tmp_path):
    """Each picks its own free rendezvous port: launcher=local and launcher=torchrun without an endpoint."""
    launchers = [["launcher=local", "launcher.nproc_per_node=2"], ["launcher=torchrun", "launcher.nproc_per_node=2"]]
    tiny = [*BASE, "train.steps=3", "train.seq_len=32"]
    jobs = [
        start_agent([*tiny, *lc, f"run.dir={tmp_path / f'run{i}'}"], tmp_path / f"job{i}")
        for i, lc in enumerate(launchers)
    ]
    try:
        statuses = [job.wait(timeout=240) for job in jobs]
    finally:
        for job in jobs:
            job.kill()
    errs = {f.name: f.read_text()[-2000:] for f in tmp_path.glob("job*.stderr")}
    assert statuses == [0, 0], errs
    for i in range(2):
        last = (tmp_path / f"run{i}" / "metrics.jsonl").read_text().splitlines()[-1]
        assert json.loads(last)["step"] == 3


def test_busy_rendezvous_port_fails_before_spawning(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        endpoint = f"127.0.0.1:{busy.getsockname()[1]}"
        run_dir = tmp_path / "run"
        args = ["train", *BASE, "launcher=torchrun", f"launcher.rdzv_endpoint={endpoint}", f"run.dir={run_dir}"]
        assert cli_main(args) == 2
    assert capsys.readouterr().err == (
        f"moeyard: config error: launcher.rdzv_endpoint={endpoint}: port {endpoint.split(':')[1]} is already in use "
        "on this host (rule: node 0 hosts the rendezvous there; pick a free port, or leave launcher.rdzv_endpoint "
        "unset on one node)\n"
    )
    assert not (tmp_path / "run").exists()


def test_multinode_torchrun_needs_an_endpoint(tmp_path, capsys):
    args = ["train", *BASE, "launcher=torchrun", "launcher.nnodes=2", f"run.dir={tmp_path / 'run'}"]
    assert cli_main(args) == 2
    assert capsys.readouterr().err == (
        "moeyard: config error: launcher.rdzv_endpoint=None must be given for launcher.nnodes=2 (rule: every "
        "node's agent meets at node 0's host:port)\n"
    )


@pytest.mark.parametrize(
    ("overrides", "shown"),
    [
        (["launcher.nproc_per_node=2"], ["-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone"]),
        ([], ["-P", "-m", "moeyard.launch.rank"]),
    ],
)
def test_local_dry_run_prints_the_command_and_starts_nothing(tmp_path, capsys, overrides, shown):
    run_dir = tmp_path / "run"
    assert cli_main(["train", *BASE, *overrides, "launcher.dry_run=true", f"run.dir={run_dir}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"MOEYARD_CONFIG={run_dir / 'config.yaml'} "), out
    assert " ".join(shown) in out[0]
    assert [p.name for p in run_dir.iterdir()] == ["config.yaml"]  # the file the command reads; nothing else
