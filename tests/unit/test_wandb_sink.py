"""The Weights & Biases sink, in W&B's offline mode (no network): a short single-process run logs every metrics
line's scalars at its step, the expert-load heatmap image and per-layer figures, and the resolved job config; a
resumed run (train.resume=auto) continues the same W&B run id; a missing wandb package is one line, exit 2.

The offline run is read back from the transaction log W&B writes (RUN_DIR/wandb/offline-run-*/run-<id>.wandb),
the records `wandb sync` uploads. Run: .venv/bin/pytest -q tests/unit/test_wandb_sink.py
"""

from __future__ import annotations

import importlib.util
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from wandb.proto.wandb_internal_pb2 import Record

from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.profiling.sinks import WANDB_ID_FILE
from moeyard.train.trainer import Trainer
from tests.helpers import TINY

RUN = [
    *(o for o in TINY if o != "profiling=off"),  # expert load on: the heatmap is what is checked
    "profiling.progress=false",
    "profiling.breakdown_every=0",
    "profiling.wandb=true",
    "profiling.wandb_mode=offline",
]
CELL = 12  # heatmap pixels per (layer, expert) cell (profiling/sinks.py heatmap_image)


def read_records(path: Path) -> Iterator[Record]:
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of chunks, each with a 7-byte header:
    crc32, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4) after W&B's 7-byte file header ":W&B", magic, version."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def offline_run(run_dir: Path, session: int) -> tuple[Record, list[dict], Path]:
    """The `session`-th (by start time) offline W&B run of a run directory: its run record, its history rows
    (key -> value) and its files folder."""
    folder = sorted((run_dir / "wandb").glob("offline-run-*"))[session]
    records = list(read_records(next(folder.glob("run-*.wandb"))))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return run, history, folder / "files"


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three steps with a checkpoint, then train.resume=auto to step 6, in one run directory."""
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    home = run_dir.parent / "wandb_home"  # W&B's own settings and caches, kept out of the user's home
    with pytest.MonkeyPatch.context() as env:
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            env.setenv(name, str(home / name))
        env.setenv("WANDB_MODE", "offline")  # belt and braces: nothing may reach the network
        Trainer(compose([*RUN, f"run.dir={run_dir}", "checkpoint.enabled=true", "train.steps=3"])).fit()
        Trainer(compose([*RUN, f"run.dir={run_dir}", "train.resume=auto"])).fit()
    return run_dir


def test_every_logged_step_has_its_scalars_and_load_heatmap(resumed_run: Path) -> None:
    metrics = {m["step"]: m for m in map(json.loads, (resumed_run / "metrics.jsonl").read_text().splitlines())}
    load = json.loads((resumed_run / "expert_load.jsonl").read_text().splitlines()[0])
    layers, experts = len(load["layers"]), len(next(iter(load["layers"].values()))["routed"])
    steps = []
    for session in (0, 1):
        _, history, files = offline_run(resumed_run, session)
        for row in history:
            step = row["_step"]
            steps.append(step)
            assert row["train/loss"] == metrics[step]["loss"]
            assert row["train/tokens_per_s"] == metrics[step]["tokens_per_s"]
            assert row["expert_load/routed/_type"] == "image-file"
            size = (row["expert_load/routed/height"], row["expert_load/routed/width"])
            assert size == (layers * CELL, experts * CELL)
            assert (files / row["expert_load/routed/path"]).is_file()
            assert {f"expert_load/imbalance/layer{lid}" for lid in load["layers"]} <= row.keys()
    assert steps == [1, 2, 3, 4, 5, 6]


def test_the_run_carries_the_job_config_and_the_run_dirs_name(resumed_run: Path) -> None:
    run, _, _ = offline_run(resumed_run, 0)
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["model"]["n_layers"] == 2 and config["train"]["seq_len"] == 32
    assert run.display_name == resumed_run.name


def test_a_resumed_run_continues_the_same_wandb_run(resumed_run: Path) -> None:
    run_id = (resumed_run / WANDB_ID_FILE).read_text().strip()
    ids = [offline_run(resumed_run, session)[0].run_id for session in (0, 1)]
    assert ids == [run_id, run_id]


def test_missing_wandb_is_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    capsys.readouterr()
    rc = main(["train", *RUN, f"run.dir={tmp_path / 'run'}"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1
    assert "profiling.wandb=true needs wandb installed (pip install 'moeyard[wandb]')" in lines[0]
    assert not (tmp_path / "run").exists()
