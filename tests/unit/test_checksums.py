"""Checkpoint checksums: each file's CRC-32C is computed while it is written and recorded in meta.json; one
flipped bit inside a tensor (same file size) makes resume=auto fall back to the save before it with one line,
and an explicit train.resume of it refuses with one line (exit 2, nothing written). A .metadata that DCP
cannot parse is passed over the same way.
Run: .venv/bin/pytest -q tests/unit/test_checksums.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import crc32c
import pytest

from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.safe_metadata import SafeFileSystemReader
from moeyard.train.trainer import Trainer
from tests.helpers import TINY

RUN = [*TINY, "train.steps=4", "checkpoint.enabled=true", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with step_2 and step_4."""
    run = tmp_path_factory.mktemp("saved")
    Trainer(compose([*RUN, f"run.dir={run}"])).fit()
    return run


@pytest.fixture
def run(saved: Path, tmp_path: Path) -> Path:
    return shutil.copytree(saved, tmp_path / "run")


def flip_bit_in_largest_tensor(step_dir: Path) -> str:
    """Flips one bit in the middle of the largest saved tensor's bytes; returns the file's name."""
    storage = SafeFileSystemReader(step_dir).read_metadata().storage_data
    info = max(storage.values(), key=lambda s: s.length)
    path = step_dir / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return info.relative_path


def test_every_file_has_the_checksum_of_its_contents(saved: Path) -> None:
    for step in (2, 4):
        path = saved / "checkpoints" / f"step_{step}"
        meta = json.loads((path / "meta.json").read_text())
        assert meta["checksum"] == "crc32c" and set(meta["checksums"]) == set(meta["files"])
        for name, recorded in meta["checksums"].items():
            assert crc32c.crc32c((path / name).read_bytes()) == recorded, name


def test_a_flipped_bit_makes_resume_auto_fall_back_with_one_line(run: Path, capsys: pytest.CaptureFixture) -> None:
    newest = run / "checkpoints" / "step_4"
    size = {p.name: p.stat().st_size for p in newest.iterdir()}
    name = flip_bit_in_largest_tensor(newest)
    assert {p.name: p.stat().st_size for p in newest.iterdir()} == size
    capsys.readouterr()
    resumed = Trainer(compose([*RUN, f"run.dir={run}", "train.resume=auto"]))
    assert resumed.step == 2
    skipped = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(skipped) == 1, skipped
    assert f"train.resume=auto skipped {newest}: " in skipped[0] and f"{name} has crc32c" in skipped[0]


def test_an_explicit_resume_of_an_altered_checkpoint_refuses(run: Path, capsys: pytest.CaptureFixture) -> None:
    newest = run / "checkpoints" / "step_4"
    name = flip_bit_in_largest_tensor(newest)
    before = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", *RUN, f"run.dir={run}", f"train.resume={newest}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"train.resume={newest}: {name} has crc32c" in lines[0] and "meta.json records" in lines[0]
    assert {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()} == before


def test_unparseable_dcp_metadata_is_passed_over(run: Path) -> None:
    newest = run / "checkpoints" / "step_4"
    size = (newest / ".metadata").stat().st_size
    (newest / ".metadata").write_bytes(b"\x00" * size)
    notes: list[str] = []
    path, meta = ckpt.resolve("auto", run, "train.resume", on_skip=notes.append)
    assert path == run / "checkpoints" / "step_2" and meta["step"] == 2
    assert len(notes) == 1 and f"skipped {newest}: " in notes[0]
