"""Start-up pieces that need no second process: shard-addressable initial weights, resume without
initialising, and bucketed gradient all-reduce.

- moe/init.py: the generator is splitmix64 + Box-Muller (checked against a pure-Python reference); any block
  of any parameter equals the same slice of the full tensor bit for bit, whatever the block size and thread
  count; temporaries stay within one generation block.
- A resumed Trainer allocates its shards and loads them without calling the initialiser.
- parallel/data_parallel.py: gradients travel in buckets of at most BUCKET_BYTES, and a size-1 axis is only
  divided in place (no flat copy).

The multi-rank allocation rule is in tests/multiproc/test_startup_alloc.py.
Run: .venv/bin/pytest -q tests/unit/test_startup_alloc.py
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import moeyard.moe.init as init
import moeyard.parallel.data_parallel as data_parallel
import moeyard.parallel.parallelize as parallelize
from moeyard.job.compose import compose
from moeyard.moe.config import ModelConfig
from moeyard.parallel.state import full_state_dict
from moeyard.train.trainer import Trainer
from tests.helpers import TINY

CFG = ModelConfig()
EXPERT = "layers.0.moe.experts.w1"


class OpLog(TorchDispatchMode):
    """Every op called, with the elements of the new tensors it created (0 for views and in-place ops)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        created = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        created = [t for t in created if t.untyped_storage().data_ptr() not in inputs]
        self.ops.append((func.__name__, max((t.numel() for t in created), default=0)))
        return out


def test_normal_at_is_splitmix64_then_box_muller():
    key = init.stream_key(3, EXPERT)
    index = torch.tensor([0, 1, 2, 12345, 2**40 + 7] + list(range(100, 159)))
    got = init.normal_at(index.clone(), key)
    for i, value in zip(index.tolist(), got.tolist(), strict=True):
        z = init._mix_int((key + (i + 1) * init._GAMMA) & init._M64)
        u1 = (z >> 40) / 2**24 + 2**-24  # the top 24 bits, in (0, 1]
        u1 = u1 - 0.5 if u1 > 0.5 else u1 + 0.5  # normal_at reads them as a signed number shifted by 2^23
        u2 = (z & 0xFFFFFF) / 2**24
        assert value == pytest.approx(math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2), abs=2e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_every_block_equals_the_same_slice_of_the_full_tensor(threads, monkeypatch):
    shape = (5, 67, 131)
    torch.set_num_threads(threads)
    try:
        full = init.init_full_tensor(EXPERT, shape, CFG, seed=3)
        rng = random.Random(0)
        # Small blocks make every slice take the row-split and the per-leading-index paths too.
        for block in (128, 4096, init.BLOCK):
            monkeypatch.setattr(init, "BLOCK", block)
            for _ in range(30):
                start = [rng.randrange(s) for s in shape]
                size = [rng.randrange(1, s - o + 1) for s, o in zip(shape, start, strict=True)]
                got = init.init_slice_(torch.empty(size), EXPERT, shape, start, CFG, seed=3)
                want = full[tuple(slice(o, o + n) for o, n in zip(start, size, strict=True))]
                assert torch.equal(got, want), (block, start, size)
    finally:
        torch.set_num_threads(1)


def test_values_look_normal_and_depend_on_name_and_seed():
    full = init.init_full_tensor(EXPERT, (64, 64, 64), CFG, seed=0)
    assert abs(full.mean().item()) < 1e-3 * 0.02 * 10
    assert full.std().item() == pytest.approx(0.02, rel=0.01)
    assert ((full / full.std()) ** 4).mean().item() == pytest.approx(3.0, rel=0.03)  # normal kurtosis
    assert not torch.equal(full, init.init_full_tensor("layers.1.moe.experts.w1", (64, 64, 64), CFG, seed=0))
    assert not torch.equal(full, init.init_full_tensor(EXPERT, (64, 64, 64), CFG, seed=1))


def test_filling_a_shard_creates_nothing_larger_than_one_block(monkeypatch):
    monkeypatch.setattr(init, "BLOCK", 1024 - init._LANES)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # blocks on this thread: the mode sees only its ops
    out = torch.empty(3, 40, 50)  # 6000 elements: several blocks of whole rows
    with OpLog() as log:
        init.init_slice_(out, EXPERT, (8, 40, 100), (2, 0, 50), CFG, seed=0)
    assert max(n for _, n in log.ops) <= 1024


def test_resume_allocates_and_loads_without_initialising(tmp_path: Path, monkeypatch):
    run = [*TINY, f"run.dir={tmp_path}", "train.steps=1"]
    first = Trainer(compose([*run, "checkpoint.enabled=true"]))
    first.fit()

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run initialised its weights")

    monkeypatch.setattr(parallelize, "init_local_shards", refuse)
    resumed = Trainer(compose([*run, "train.resume=auto"]))
    assert resumed.step == 1
    saved, loaded = full_state_dict(first.pm), full_state_dict(resumed.pm)
    assert saved.keys() == loaded.keys()
    for name, value in saved.items():
        assert torch.equal(loaded[name], value), name
    with pytest.raises(AssertionError, match="initialised"):
        Trainer(compose([*TINY, f"run.dir={tmp_path / 'fresh'}", "train.steps=1"]))


def test_buckets_are_bounded_and_keep_order():
    grads = [torch.empty(n) for n in (10, 20, 5, 40, 3, 3)]
    buckets = data_parallel._buckets(grads, cap=30 * 4)
    assert [[g.numel() for g in b] for b in buckets] == [[10, 20], [5], [40], [3, 3]]
    assert [g for b in buckets for g in b] == grads


@pytest.fixture
def one_rank_group():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        dist.destroy_process_group()


def _model_with_grads() -> torch.nn.Module:
    model = torch.nn.ModuleDict(
        {
            "experts": torch.nn.ParameterDict({f"w{i}": torch.nn.Parameter(torch.zeros(4, 8, 8)) for i in (1, 2, 3)}),
            "wq": torch.nn.Linear(8, 8, bias=False),
            "norm": torch.nn.RMSNorm(8),
        }
    )
    for i, p in enumerate(model.parameters()):
        p.grad = torch.arange(p.numel(), dtype=torch.float32).view_as(p) + i
    return model


def test_allreduce_grads_buckets_dense_and_leaves_size_one_experts_in_place(one_rank_group, monkeypatch):
    monkeypatch.setattr(data_parallel, "BUCKET_BYTES", 70 * 4)  # wq (64) alone, norm (8) alone
    model = _model_with_grads()
    want = {n: p.grad / 4 for n, p in model.named_parameters()}
    with OpLog() as log:
        data_parallel.allreduce_grads(model, one_rank_group, None, dp=4)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, want[name]), name
    assert not any(op.startswith("cat") for op, _ in log.ops), log.ops  # one tensor per bucket: no copy
    assert sum(op.startswith("allreduce") for op, _ in log.ops) == 2
    assert max(n for _, n in log.ops) == 0  # nothing allocated: experts divided in place

    monkeypatch.setattr(data_parallel, "BUCKET_BYTES", 300 * 4)  # the three expert tensors (768) in three buckets
    model = _model_with_grads()
    with OpLog() as log:
        data_parallel.allreduce_grads(model, one_rank_group, one_rank_group, dp=4)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, want[name]), name
    cats = [n for op, n in log.ops if op.startswith("cat")]
    assert cats == [64 + 8], cats  # dense wq + norm flattened together; experts reduced in place


def test_a_parameter_of_many_blocks_fills_on_threads_like_on_one(monkeypatch):
    """A parameter (requires grad) larger than a block, filled under no_grad as build_parallel_model does:
    its blocks run on worker threads (each with its own grad mode) and give the one-thread bits."""
    shape = (3, 40, 50)
    param = torch.nn.Parameter(torch.empty(shape))
    monkeypatch.setattr(init, "BLOCK", 1024 - init._LANES)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    with torch.no_grad():
        init.init_slice_(param, EXPERT, shape, (0, 0, 0), CFG, seed=0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert torch.equal(param.detach(), init.init_full_tensor(EXPERT, shape, CFG, seed=0))
