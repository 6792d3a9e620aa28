"""Staging of background checkpoint saves (parallel/staging.py): the host buffers are allocated once and
reused by the next save (the same memory), every tensor, a DTensor's shard included, is copied exactly once
(counted at torch's dispatch level), a changed shape or dtype gets a new buffer, and two async saves of a
trainer read back exactly the values each one saved, with checksums that match the files. CUDA: the buffers
of device shards are pinned (marked gpu, skipped without CUDA).
Run: .venv/bin/pytest -q tests/unit/test_async_stage.py
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard
from torch.utils._python_dispatch import TorchDispatchMode

from moeyard.job.compose import compose
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.staging import HostStager
from tests.ckpt_faults import saved_tensors
from tests.helpers import TINY, make_trainer

COPIES = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default, torch.ops.aten.clone.default}
"""The ops that copy tensor data (a `.to`, `.cpu()`, `.clone()` or `copy_` reaches one of them)."""


class CopyCounter(TorchDispatchMode):
    """Counts the data copies torch runs in this thread, and which tensors (by data pointer) each read."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: Counter = Counter()
        self.sources: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in COPIES:
            self.copies[func] += 1
            self.sources.append((args[1] if func is torch.ops.aten.copy_.default else args[0]).data_ptr())
        return func(*args, **(kwargs or {}))


@pytest.fixture
def mesh():
    """A one-rank gloo mesh: enough to build DTensors."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def state_dict(mesh) -> dict[str, torch.Tensor]:
    """A DTensor whose shard is a view into a larger tensor (only the view is to be copied), a plain tensor,
    a 0-dim step counter and an RNG state (uint8)."""
    whole = torch.randn(8, 4)
    return {
        "model.w": DTensor.from_local(whole[2:6], mesh, [Shard(0)], run_check=False),
        "optim.w.exp_avg": torch.randn(5, 3),
        "optim.w.step": torch.tensor(3.0),
        "rng.rank0.cpu": torch.get_rng_state(),
    }


def local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if isinstance(value, DTensor) else value


def test_buffers_are_reused_and_each_tensor_is_copied_once(mesh) -> None:
    state = state_dict(mesh)
    stager = HostStager()
    pointers = []
    for round_ in range(2):
        with torch.no_grad():  # training changed the values since the last save
            for value in state.values():
                local(value).add_(1)
        with CopyCounter() as counter:
            staged = stager.stage(state)
        assert counter.copies == {torch.ops.aten.copy_.default: len(state)}, round_
        assert sorted(counter.sources) == sorted(local(v).data_ptr() for v in state.values()), round_
        assert staged.keys() == state.keys()
        for key, value in state.items():
            got = staged[key]
            assert type(got) is type(value), key
            if isinstance(value, DTensor):
                assert got.placements == value.placements and got.shape == value.shape, key
            assert torch.equal(local(got), local(value)), (round_, key)
            assert local(got).data_ptr() != local(value).data_ptr(), key  # a copy, not the original
        pointers.append({key: local(got).data_ptr() for key, got in staged.items()})
    assert pointers[0] == pointers[1]


def test_a_changed_shape_or_dtype_gets_a_new_buffer(mesh) -> None:
    stager = HostStager()
    stager.stage({"a": torch.zeros(4), "b": torch.zeros(4)})
    before = dict(stager.buffers)
    staged = stager.stage({"a": torch.ones(5), "b": torch.ones(4, dtype=torch.float64)})
    assert staged["a"].shape == (5,) and staged["b"].dtype == torch.float64
    assert torch.equal(staged["a"], torch.ones(5)) and torch.equal(staged["b"], torch.ones(4, dtype=torch.float64))
    assert all(stager.buffers[k] is not before[k] for k in before)


def test_two_async_saves_write_what_each_saved(tmp_path: Path) -> None:
    """The second save reuses the first one's buffers; each save reads back as the model was when it was
    staged (not as training left it later), and its files match their checksums."""
    trainer = make_trainer(compose([*TINY, "train.steps=2", f"run.dir={tmp_path / 'run'}"]))
    root, stager = tmp_path / "checkpoints", HostStager()
    named = dict(ckpt.model_tensors(trainer.pm))
    pointers, expected = [], []
    for step in (1, 2):
        trainer.train_step(log=False)
        expected.append({f"model.{name}": t.detach().clone() for name, t in named.items()})
        with CopyCounter() as counter:
            pending = ckpt.start_save(trainer.pm, trainer.optimizer, step, root, {"lineage": "x"}, stager=stager)
        assert sum(counter.copies.values()) == len(stager.buffers)  # one copy per entry, on this thread
        pointers.append({key: t.data_ptr() for key, t in stager.buffers.items()})
        with torch.no_grad():
            for t in named.values():
                t.add_(1.0)  # training goes on while the write runs: the save must not see this
        ckpt.finish_save(pending, keep=2)
    assert pointers[0] == pointers[1]
    for step, want in zip((1, 2), expected, strict=True):
        path, meta = ckpt.resolve(str(root / f"step_{step}"), tmp_path, "train.resume")  # checksums verified
        got = saved_tensors(path)
        for key, value in want.items():
            assert torch.equal(got[key], value), (step, key)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_shards_stage_into_pinned_buffers() -> None:
    source = {"w": torch.randn(64, 64, device="cuda"), "rng.rank0.cpu": torch.get_rng_state()}
    stager = HostStager()
    staged = stager.stage(source)
    assert staged["w"].is_pinned() and staged["w"].device.type == "cpu"
    assert not staged["rng.rank0.cpu"].is_pinned()
    assert torch.equal(staged["w"], source["w"].cpu())
    pointer = staged["w"].data_ptr()
    source["w"].mul_(2)
    assert stager.stage(source)["w"].data_ptr() == pointer
    assert torch.equal(stager.buffers["w"], source["w"].cpu())
