"""Checkpoints at scale: no rank ever holds more than its own shards.

- Save and load under dp4*ep2 FSDP (4 gloo ranks; experts split over ep, then over edp=2 by FSDP): with
  DTensor.full_tensor/redistribute made to raise and every dispatched op recorded, no floating-point tensor
  is all-gathered and none is larger than the rank's largest local shard; DCP's metadata holds each expert
  weight as four shard-sized chunks at their global offsets; the load fills a fresh model's shards with the
  saved ones bit for bit and parses .metadata once per process.
- Hugging Face import under dp4*ep2 FSDP and tp2*ep2: every safetensors read (recorded through safe_open) is
  a slice of this rank's shard: its local experts only, its TP rows/columns, whole heads of q/k only where
  the shard holds part of a head; the shards equal the exported weights' slices.
- Async saves (two torchrun ranks, ep2): checkpoints bitwise equal to the sync run's, and a run SIGKILLed
  while a background write is in flight leaves the previous sealed checkpoint, from which the restarted
  run continues to the uninterrupted run's losses.
Run: .venv/bin/pytest -q tests/multiproc/test_checkpoint_scale.py
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import moeyard.interop.hf
import moeyard.interop.hf as train_hf
import moeyard.parallel.safe_metadata
import moeyard.parallel.safe_metadata as parallel_safe_metadata
from moeyard.interop.hf import export
from moeyard.job.compose import compose
from moeyard.moe.config import ModelConfig
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.shards import shard_extent
from moeyard.train.trainer import Trainer
from tests.ckpt_faults import saved_tensors
from tests.helpers import MOEYARD, REPO, TINY, free_port, local_rank_env, make_trainer, slice_only_safe_open, spawn

EXPERT = "layers.0.moe.experts.w1"
DP4_EP2 = ["parallel.ep=2", "parallel.dp_mode=fsdp"]
"""Four ranks: dp=4, experts over ep=2 and, within each ep block, over edp=2 by FSDP."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class OpRecorder(TorchDispatchMode):
    """Records the largest floating-point tensor any op produces (local part of a DTensor) and every
    all-gather of floating-point data (DCP's own object collectives move bytes and integers)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = (0, "")
        self.gathers: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        floats = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if "gather" in str(func) and floats:
            self.gathers.append(str(func))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
                self.largest = max(self.largest, (_local(t).numel(), str(func)))
        return out


@contextmanager
def no_gathering():
    """DTensor.full_tensor and redistribute raise inside (a checkpoint path must never call them)."""

    def forbidden(self, *args, **kwargs):
        raise AssertionError(f"gathered a DTensor of shape {tuple(self.shape)}")

    saved = DTensor.full_tensor, DTensor.redistribute
    DTensor.full_tensor = DTensor.redistribute = forbidden
    try:
        yield
    finally:
        DTensor.full_tensor, DTensor.redistribute = saved


@contextmanager
def counting_metadata_reads(counts: list[int]):
    """Appends 1 to `counts` for every parse of a .metadata file."""
    unpickler = parallel_safe_metadata._MetadataUnpickler
    original = unpickler.load

    def load(self):
        counts.append(1)
        return original(self)

    unpickler.load = load
    try:
        yield
    finally:
        unpickler.load = original


def _shards(trainer: Trainer, rank: int) -> dict[str, torch.Tensor]:
    return {k: _local(v) for k, v in ckpt.build_state(trainer.pm, trainer.optimizer, rank, {}).items()}


def _save_load_rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    local_rank_env(rank, world, port)
    cfg = compose(overrides)
    trained = make_trainer(cfg)
    trained.fit()
    saved = {k: v.clone() for k, v in _shards(trained, rank).items()}
    expert = dict(trained.pm.named_parameters())[EXPERT]
    save_ops = OpRecorder()
    with no_gathering(), save_ops:
        path = ckpt.save(trained.pm, trained.optimizer, 2, Path(cfg.run.dir) / "ck", 1, trained.checkpointer.meta())
    fresh = make_trainer(cfg)  # initialised afresh: nothing trained, zero optimizer state
    reads: list[int] = []
    load_ops = OpRecorder()
    with no_gathering(), counting_metadata_reads(reads), load_ops:
        path, meta = ckpt.resolve(str(path), cfg.run.dir, "train.resume")
        ckpt.load(fresh.pm, fresh.optimizer, path, meta, "train.resume")
    loaded = _shards(fresh, rank)
    chunks = meta[ckpt.DCP_METADATA].state_dict_metadata[f"model.{EXPERT}"].chunks
    em = trained.pm.expert_mesh
    result = {
        "expert": (type(expert).__name__, str(expert.placements), tuple(_local(expert).shape)),
        "coords": (em["ep"].get_local_rank(), em["edp"].get_local_rank()),
        "largest_shard": max(v.numel() for v in saved.values() if v.is_floating_point()),
        "save": (save_ops.largest, save_ops.gathers),
        "load": (load_ops.largest, load_ops.gathers),
        "metadata_reads": len(reads),
        "chunks": sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks),
        "differ": sorted(k for k in saved if not torch.equal(saved[k], loaded[k])),
        "keys": sorted(saved) == sorted(loaded),
    }
    torch.save(result, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(worker, world: int, overrides: list[str], out: Path) -> list[dict]:
    """Runs `worker` on `world` gloo ranks; returns each rank's result."""
    spawn(worker, (world, free_port(), overrides, str(out)), world)
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(world)]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_save_and_load_never_gather_an_expert_shard(tmp_path: Path) -> None:
    overrides = [*TINY, *DP4_EP2, "train.steps=2", f"run.dir={tmp_path}"]
    results = run_ranks(_save_load_rank, 4, overrides, tmp_path / "result")
    # Experts [8, 64, 32]: ep rank r holds experts 4r..4r+3, of which edp rank s holds 4r+2s, 4r+2s+1.
    full = 8 * 64 * 32
    assert sorted(r["coords"] for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in results:
        assert r["expert"] == ("DTensor", "(Shard(dim=0),)", (2, 64, 32)), r["expert"]
        assert r["largest_shard"] < full
        for what in ("save", "load"):
            (largest, op), gathers = r[what]
            assert not gathers, (what, gathers)
            assert largest <= r["largest_shard"], (what, op, largest, r["largest_shard"])
        assert r["metadata_reads"] == 1
        assert r["keys"] and not r["differ"], r["differ"]
        assert r["chunks"] == [((e, 0, 0), (2, 64, 32)) for e in (0, 2, 4, 6)]


# --- Hugging Face import reads slices -------------------------------------------------------------------


def _hf_rank(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    local_rank_env(rank, world, port)
    reads: list[tuple[str, tuple[int, ...]]] = []
    real = train_hf.safe_open
    train_hf.safe_open = slice_only_safe_open(real, lambda name, t: reads.append((name, tuple(t.shape))))
    try:
        trainer = make_trainer(compose(overrides))
    finally:
        train_hf.safe_open = real
    shards = {}
    for name, t in ckpt.model_tensors(trainer.pm):
        shape, offset, local = shard_extent(name, t, trainer.pm.dims, trainer.pm.expert_mesh)
        shards[name] = (tuple(shape), offset, local.clone())
    torch.save({"reads": reads, "shards": shards}, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _expected_reads(param: str, full_shape: tuple, offset: tuple, shape: tuple, m: ModelConfig) -> list:
    """The (HF name, shape) reads a shard at `offset` of size `shape` needs: per local expert its
    transposed box; for q/k the whole heads its rows fall in; for anything else exactly the box."""
    names = [k for k, _ in train_hf.to_hf(param, torch.empty(full_shape, device="meta"), m)]
    if ".moe.experts.w" in param:
        return [(names[e], (shape[2], shape[1])) for e in range(offset[0], offset[0] + shape[0])]
    if param.endswith(("attention.wq.weight", "attention.wk.weight")):
        first, last = offset[0] // m.head_dim, -(-(offset[0] + shape[0]) // m.head_dim)
        return [(names[0], ((last - first) * m.head_dim, shape[1]))]
    return [(names[0], shape)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """One trained step of the tiny model, exported as Mixtral safetensors; and its full weights."""
    run = tmp_path_factory.mktemp("hf_run")
    trainer = make_trainer(
        compose([*TINY, "moe.bias_update_rate=0", "train.steps=1", "checkpoint.enabled=true", f"run.dir={run}"])
    )
    trainer.fit()
    out = run.parent / f"{run.name}-hf"
    export(run, out)
    return out, {name: p.detach().clone() for name, p in trainer.pm.named_parameters()}


HF_LAYOUTS = [("dp4_ep2_fsdp", 4, DP4_EP2), ("tp2_ep2", 2, ["parallel.tp=2", "parallel.ep=2"])]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("name", "world", "layout"), HF_LAYOUTS, ids=[x[0] for x in HF_LAYOUTS])
def test_hf_import_reads_only_the_ranks_slices(hf_dir, tmp_path: Path, name: str, world: int, layout) -> None:
    out, weights = hf_dir
    overrides = [*TINY, "moe.bias_update_rate=0", *layout, f"train.init_from={out}", f"run.dir={tmp_path}"]
    results = run_ranks(_hf_rank, world, overrides, tmp_path / "result")
    m = compose(overrides).model
    partial = 0
    for rank, r in enumerate(results):
        want = []
        for param, (full_shape, offset, local) in r["shards"].items():
            if param.endswith("expert_bias") or not local.numel():
                continue
            box = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
            assert torch.equal(local, weights[param][box]), (rank, param)
            partial += local.numel() < torch.Size(full_shape).numel()
            want += _expected_reads(param, full_shape, offset, tuple(local.shape), m)
        assert sorted(r["reads"]) == sorted(want), (rank, sorted(set(r["reads"]) ^ set(want)))
    assert partial > 0  # the layout really shards: reads smaller than whole tensors were checked


# --- asynchronous saves ---------------------------------------------------------------------------------

ASYNC_RUN = [*TINY, "checkpoint.enabled=true", "checkpoint.every=2", "parallel.ep=2"]


def moeyard(run: Path, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`moeyard train TINY... ARGS` on two torchrun ranks, the repository root on PYTHONPATH."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    torchrun = ["launcher=torchrun", "launcher.nproc_per_node=2", f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}"]
    return subprocess.run(
        [str(MOEYARD), "train", *ASYNC_RUN, *torchrun, *args, f"run.dir={run}"],
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        cwd=run.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses_by_step(run: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in rows}


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("async") / "sync"
    done = moeyard(run, [])
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_async_saves_equal_sync_saves(sync_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "async"
    done = moeyard(run, ["checkpoint.async_save=true"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses_by_step(run) == losses_by_step(sync_run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4", "step_6"]
    for step in ("step_4", "step_6"):
        a, b = run / "checkpoints" / step, sync_run / "checkpoints" / step
        meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (a, b))
        assert meta_a.keys() == meta_b.keys()
        # Each run has its own lineage, and DCP's .metadata differs in bookkeeping (its checksum with it); the
        # tensor files' checksums and everything else must agree.
        differ = ("files", "lineage", "checksums")
        same_a, same_b = ({k: v for k, v in m.items() if k not in differ} for m in (meta_a, meta_b))
        assert same_a == same_b
        tensors_a, tensors_b = ({k: v for k, v in m["checksums"].items() if k != ".metadata"} for m in (meta_a, meta_b))
        assert tensors_a == tensors_b
        assert meta_a["files"].keys() == meta_b["files"].keys()
        got, want = saved_tensors(a), saved_tensors(b)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), (step, key)


@pytest.mark.multiproc
@pytest.mark.timeout(420)
def test_kill_during_background_write_resumes_from_previous_seal(sync_run: Path, tmp_path: Path) -> None:
    """The ranks are SIGKILLed at the end of step 4 with step 4's background write held mid-flight:
    torchrun restarts them (max_restarts=1), the restarted run resumes from step 2 (step_4.tmp was never
    sealed) and ends with the uninterrupted (sync) run's losses."""
    run = tmp_path / "killed"
    kill = "train.callbacks=[{_target_:tests.ckpt_faults.BackgroundWriteKill,step:4}]"
    done = moeyard(run, ["checkpoint.async_save=true", "launcher.max_restarts=1", kill])
    assert done.returncode == 0, done.stderr[-3000:]
    # The first rank to die took the other down with it (torchrun), perhaps before it got as far: at least
    # one rank recorded dying at the end of step 4 with its write unfinished and step 4 unsealed.
    evidence = sorted(run.glob("killed_rank*.json"))
    assert evidence
    for path in evidence:
        seen = json.loads(path.read_text())
        assert seen["step"] == 4 and seen["in_flight"] and "COMPLETE" not in seen["tmp"], seen
    root = run / "checkpoints"
    assert f"resumed at step 2 from {root / 'step_2'}" in done.stdout, done.stdout[-3000:]
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]  # the restart cut steps 3-4 of the first attempt: each step once
    assert losses_by_step(run) == losses_by_step(sync_run)
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_6"]
