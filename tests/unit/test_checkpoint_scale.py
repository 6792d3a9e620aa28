"""Checkpoints at scale, in one process: the placements that describe FSDP's expert shards to DCP match
FSDP's own split (even and uneven); an async save writes exactly what a sync save writes, sealed only once
its background write is done; export loads one checkpoint entry at a time and parses .metadata once; the
streaming safetensors writer produces what safetensors' save_file does.
Run: .venv/bin/pytest -q tests/unit/test_checkpoint_scale.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

import moeyard.interop.hf as train_hf
import moeyard.parallel.safe_metadata as parallel_safe_metadata
from moeyard.interop.hf import export, write_safetensors
from moeyard.job.compose import compose
from moeyard.parallel.shards import fsdp_expert_placements
from moeyard.train.callbacks import Callback
from tests.ckpt_faults import saved_tensors
from tests.helpers import TINY, make_trainer


@pytest.mark.parametrize(("experts", "ep", "edp"), [(8, 2, 2), (6, 2, 2), (8, 4, 3), (12, 2, 4), (4, 1, 3)])
def test_fsdp_expert_placements_match_fsdps_split(experts: int, ep: int, edp: int) -> None:
    """At every (edp, ep) coordinate the DTensor placements give the rows FSDP holds: ep rank j's block of
    E/ep experts, then edp rank i's torch.chunk of it (uneven or empty where E/ep is not a multiple of edp)."""
    rows = torch.arange(experts)
    for i in range(edp):
        for j in range(ep):
            held = rows.chunk(ep)[j].chunk(edp)
            held = held[i] if i < len(held) else rows[:0]
            shape, offset = _compute_local_shape_and_global_offset(
                (experts, 3), (edp, ep), [i, j], fsdp_expert_placements(ep)
            )
            assert shape == (len(held), 3), (i, j)
            if len(held):
                assert offset == (int(held[0]), 0), (i, j)


class PendingProbe(Callback):
    """Records, at the end of each step, which save is still being written in the background."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, int | None, bool]] = []

    def on_step_end(self, trainer, step: int, metrics: dict[str, float]) -> None:
        pending = trainer.checkpointer.pending
        sealed = (trainer.checkpointer.root / f"step_{step}" / "COMPLETE").is_file()
        self.pending.append((step, pending and pending.step, sealed))


def test_async_save_writes_what_a_sync_save_writes(tmp_path: Path) -> None:
    common = [*TINY, "train.steps=4", "checkpoint.enabled=true", "checkpoint.every=2"]
    make_trainer(compose([*common, f"run.dir={tmp_path / 'sync'}"])).fit()
    probe = PendingProbe()
    async_cfg = compose([*common, "checkpoint.async_save=true", f"run.dir={tmp_path / 'async'}"])
    make_trainer(async_cfg, callbacks=[probe]).fit()
    # Step 2's save is still open at the end of step 2 and sealed before step 4's; the last one is sealed at once.
    assert probe.pending == [(1, None, False), (2, 2, False), (3, 2, False), (4, None, True)]
    for step in (2, 4):
        a, b = (tmp_path / run / "checkpoints" / f"step_{step}" for run in ("async", "sync"))
        meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (a, b))
        files_a, files_b = meta_a.pop("files"), meta_b.pop("files")
        sums_a, sums_b = meta_a.pop("checksums"), meta_b.pop("checksums")  # .metadata names its directory
        assert meta_a.pop("lineage") != meta_b.pop("lineage")  # two runs
        assert meta_a == meta_b
        assert files_a.keys() == files_b.keys() and files_a["__0_0.distcp"] == files_b["__0_0.distcp"]
        assert sums_a.keys() == sums_b.keys() and sums_a["__0_0.distcp"] == sums_b["__0_0.distcp"]
        got, want = saved_tensors(a), saved_tensors(b)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), (step, key)


def test_export_streams_one_entry_at_a_time(tmp_path: Path) -> None:
    run = tmp_path / "run"
    make_trainer(
        compose([*TINY, "moe.bias_update_rate=0", "train.steps=1", "checkpoint.enabled=true", f"run.dir={run}"])
    ).fit()
    loaded: list[list[str]] = []
    parses: list[int] = []
    real_load, real_parse = train_hf.dcp.load, parallel_safe_metadata._MetadataUnpickler.load

    def load(state, **kwargs):
        loaded.append(sorted(state))
        return real_load(state, **kwargs)

    def parse(self):
        parses.append(1)
        return real_parse(self)

    train_hf.dcp.load, parallel_safe_metadata._MetadataUnpickler.load = load, parse
    try:
        export(run, tmp_path / "hf")
    finally:
        train_hf.dcp.load, parallel_safe_metadata._MetadataUnpickler.load = real_load, real_parse
    names = [name for name, _ in make_trainer(compose([*TINY, f"run.dir={tmp_path / 'x'}"])).pm.named_parameters()]
    assert sorted(loaded) == sorted([f"model.{name}"] for name in names)
    assert len(parses) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_writer_matches_save_file(tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = {"b.weight": torch.randn(3, 5), "a.bias": torch.randn(7), "c": torch.randn(2, 3, 4)}
    layout = [(name, t.shape) for name, t in tensors.items()]
    size = write_safetensors(tmp_path / "ours.safetensors", layout, dtype, iter(tensors.items()))
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(tmp_path / "theirs.safetensors"), {"format": "pt"})
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert ours[name].dtype == dtype and torch.equal(ours[name], value), name
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert size == sum(t.numel() for t in tensors.values()) * torch.empty((), dtype=dtype).element_size()
    assert (tmp_path / "ours.safetensors").stat().st_size == (tmp_path / "theirs.safetensors").stat().st_size
