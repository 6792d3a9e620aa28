"""Helpers shared by the test modules (not a test module): ports and rank environments, the tiny configs,
running `moeyard` and layouts on gloo ranks, and reading losses back.

Every multi-rank launcher run is compared with one process training the same config (model=debug, 5 steps);
the reference is computed once per pytest session and cached under its base temp directory. `run_layout`
trains a config on `world` gloo ranks through torch.multiprocessing and returns rank 0's history and the
gathered parameters; by hand: `python -m tests.helpers OUT.pt WORLD key=value ...`.
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
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.config import compose
from parallel.state import full_state_dict
from train.trainer import Trainer

TINY = [
    "model=debug",
    "model.n_layers=2",
    "train.seq_len=32",
    "train.steps=6",
    "data.max_files=20",
    "profiling=off",
    "train.eval_every=0",
    "moe.bias_update_rate=0.01",
]
"""A two-block debug model with aux-free bias on, for checkpoint and fault tests."""


def history_losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history]


BASE = ["model=debug", "train.steps=5", "profiling.progress=false"]
REPO = Path(__file__).resolve().parent.parent
MOEYARD = Path(sys.executable).with_name("moeyard")
"""The installed `moeyard` console script of the running (venv) python."""


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


def run_losses(run_dir: Path) -> list[float]:
    """The `loss` column of RUN_DIR/metrics.jsonl."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def reference_losses(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    """Losses of the single-process run of BASE (launcher=local, parallel=single), computed once."""
    run_dir = tmp_path_factory.getbasetemp() / "launch_reference"
    if not (run_dir / "metrics.jsonl").exists():
        out = moeyard(*BASE, f"run.dir={run_dir}", timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]
    return run_losses(run_dir)


def assert_same_losses(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == 5, (got, want)
    for step, (g, w) in enumerate(zip(got, want, strict=True), start=1):
        assert math.isclose(g, w, rel_tol=1e-5), f"step {step}: loss {g} != single-process {w}"


def _rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    local_rank_env(rank, world, port)
    cfg = compose(overrides)
    trainer = Trainer(cfg)
    history = trainer.fit()
    state = full_state_dict(trainer.pm)
    if rank == 0:
        torch.save({"history": history, "state": state}, out)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_layout(overrides: list[str], world: int, out: str, port: int) -> dict:
    """Trains `overrides` on `world` gloo ranks; returns {"history", "state"} from rank 0."""
    mp.start_processes(_rank, args=(world, port, overrides, out), nprocs=world, start_method="spawn")
    return torch.load(out, weights_only=True)


if __name__ == "__main__":
    result = run_layout(sys.argv[3:], int(sys.argv[2]), sys.argv[1], free_port())
    print([round(h["loss"], 6) for h in result["history"]])
