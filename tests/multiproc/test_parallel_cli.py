"""Parallel layouts through the real command line: validation before spawning, and torchrun runs.

- Invalid layouts fail in the launching process with one line naming field, value and rule (no rank starts).
- `moeyard train launcher=torchrun launcher.nproc_per_node=8 parallel.tp=2 parallel.pp=2 parallel.ep=2
  model=debug train.steps=5` writes the same `loss` values to metrics.jsonl as the one-process run.

    .venv/bin/pytest -q tests/multiproc/test_parallel_cli.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moeyard.job.compose import compose
from moeyard.job.schema import ConfigError
from moeyard.launch.validate import validate
from tests.helpers import free_port

MOEYARD = [sys.executable, "-m", "moeyard.launch.cli"]

BAD_LAYOUTS = [
    (["parallel.tp=2", "parallel.pp=2"], 6, "parallel.pp*tp=4 must divide the world size 6"),
    (["parallel.dp=2", "parallel.tp=2"], 8, "parallel.pp*dp*tp=1*2*2 must equal the world size 8"),
    (["parallel.ep=3"], 3, "parallel.ep=3 must divide moe.num_experts=8"),
    (["parallel.ep=4"], 2, "parallel.ep=4 must divide dp x tp = 2x1"),
    (["parallel.tp=8"], 8, "parallel.tp=8 must divide model.n_heads=4"),
    (["parallel.tp=4"], 4, "parallel.tp=4 must divide model.n_kv_heads=2"),
    (["parallel.pp=8", "train.micro_batches=8"], 8, "model.n_layers=4 is too few for 8 pipeline stages"),
    (["parallel.pp=2", "train.micro_batches=1"], 2, "train.micro_batches=1 must be >= parallel.pp=2"),
    (
        ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b"],
        2,
        "parallel.pp_stages_per_rank=1 must be >= 2 for pp_schedule=interleaved_1f1b",
    ),
    (
        [
            "parallel.pp=2",
            "parallel.pp_schedule=interleaved_1f1b",
            "parallel.pp_stages_per_rank=2",
            "train.micro_batches=3",
            "train.batch_size=6",
        ],
        2,
        "train.micro_batches=3 must be a multiple of parallel.pp=2",
    ),
    (
        ["parallel.pp=2", "parallel.pp_layers=[1,2]"],
        2,
        "parallel.pp_layers=[1, 2] must give 2 positive counts",
    ),
    (
        ["train.batch_size=6"],
        4,
        "train.batch_size/micro_batches=3 must be divisible by the data-parallel degree",
    ),
    (
        ["parallel.pp=2", "model.tie_embeddings=true"],
        2,
        "model.tie_embeddings=True is not supported with parallel.pp",
    ),
    (["parallel.dp_mode=zero3"], 1, "parallel.dp_mode=zero3 must be one of replicate, zero1, zero2, fsdp"),
]


@pytest.mark.parametrize(("overrides", "world", "message"), BAD_LAYOUTS, ids=[m.split()[0] for *_, m in BAD_LAYOUTS])
def test_invalid_layout_is_rejected(overrides, world, message):
    cfg = compose(["model=debug", *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_rejects_layout_before_spawning(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            *MOEYARD,
            "train",
            "model=debug",
            "launcher=torchrun",
            "launcher.nproc_per_node=4",
            "parallel.tp=3",
            f"run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("moeyard: config error: parallel.pp*tp=3 must divide the world size 4")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not run_dir.exists()


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_torchrun_tp2_pp2_ep2_matches_one_process(tmp_path):
    common = ["model=debug", "train.steps=5", "train.log_every=1", "profiling.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([*MOEYARD, "train", *common, f"run.dir={single}"], check=True, timeout=300, env=env)
    multi = tmp_path / "multi"
    subprocess.run(
        [
            *MOEYARD,
            "train",
            *common,
            "launcher=torchrun",
            "launcher.nproc_per_node=8",
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.ep=2",
            f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}",
            f"run.dir={multi}",
        ],
        check=True,
        timeout=540,
        env=env,
    )
    assert _losses(multi) == pytest.approx(_losses(single), rel=1e-5)
    assert len(_losses(multi)) == 5
