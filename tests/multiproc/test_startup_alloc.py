"""Scale-true start-up: building the trainer allocates only this rank's shards, and they hold one process's weights.

For every multi-rank layout of the golden tests, each rank constructs its Trainer (mesh, model, optimizer, data,
checkpointer; no step) under a TorchDispatchMode that records the elements of every tensor an op creates off the
meta device. The rule: no rank creates a tensor larger than the layout's largest local parameter shard plus one
expert matrix (D x F). Afterwards (outside the recording) the gathered initial parameters must equal one
process's `init_weights` bit for bit.

The model is the debug model with 32 experts, so that a full expert tensor (32 x 64 x 32) exceeds the bound
wherever experts are sharded (ep, FSDP). The materialise-then-slice start-up that this replaced fails here
under every ep and FSDP layout (it drew each full tensor, and under FSDP the whole model, on every rank).
Layouts of one world size share one spawned process group, so the file costs three spawns (2, 4, 8 ranks).
It also runs `benchmarks/startup.py --quick` once, so the start-up benchmark keeps working.

Run: .venv/bin/pytest -q tests/multiproc/test_startup_alloc.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moeyard.job.compose import compose
from moeyard.moe.model import Transformer, init_weights
from moeyard.parallel.state import full_state_dict
from moeyard.train.trainer import Trainer
from tests.helpers import free_port, local_rank_env, spawn
from tests.multiproc.test_golden import BASE, LAYOUTS

MODEL = ["moe.num_experts=32", "data.max_files=2"]
"""Applied after each layout's variant: more experts than any shard holds; a small corpus to read."""
WORLDS = sorted({world for _, world, _, _ in LAYOUTS if world > 1})


class AllocationRecorder(TorchDispatchMode):
    """Records the largest tensor (elements) that any op creates on a real device, with the op and shape."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = (0, "", ())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # Let DTensor run its local ops, which come back through this mode.
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        plain = [t for t in tree_leaves(out) if type(t) is torch.Tensor and not t.is_meta]  # not fake or meta
        if not plain:
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if type(t) is torch.Tensor}
        for t in plain:
            if t.untyped_storage().data_ptr() in inputs:  # a view or an in-place result: nothing new
                continue
            if t.numel() > self.largest[0]:
                self.largest = (t.numel(), str(func), tuple(t.shape))
        return out


def _largest_shard(trainer: Trainer) -> int:
    """Elements of this rank's largest local parameter shard."""
    return max((p.to_local() if isinstance(p, DTensor) else p).numel() for _, p in trainer.pm.named_parameters())


def _one_process_init(cfg) -> dict[str, torch.Tensor]:
    model = Transformer(cfg.model, cfg.moe)
    init_weights(model, cfg.train.seed)
    state = {n: p.detach() for n, p in model.named_parameters()}
    for lid, moe in model.moe_layers().items():
        state[f"layers.{lid}.moe.router.expert_bias"] = moe.router.expert_bias
    return state


def _check_layout(overrides: list[str], rank: int) -> dict:
    cfg = compose(overrides)
    recorder = AllocationRecorder()
    with recorder:
        trainer = Trainer(cfg)
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, (*recorder.largest, _largest_shard(trainer)))
    # Uneven FSDP shards: a rank holds (and FSDP pads to) the largest rank's shard.
    bound = max(shard for *_, shard in found) + cfg.model.dim * cfg.moe.expert_hidden
    initial = full_state_dict(trainer.pm)
    trainer.guard.close()
    mismatched = []
    if rank == 0:
        want = _one_process_init(cfg)
        assert initial.keys() == want.keys(), sorted(initial.keys() ^ want.keys())
        mismatched = [name for name, value in want.items() if not torch.equal(initial[name], value)]
    return {"bound": bound, "ranks": found, "mismatched": mismatched}


def _rank(rank: int, world: int, port: int, cases: list[tuple[str, list[str]]], out: str) -> None:
    local_rank_env(rank, world, port)
    results = {}
    for name, overrides in cases:
        results[name] = _check_layout(overrides, rank)
        dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.timeout(900)
@pytest.mark.parametrize("world", WORLDS)
def test_startup_allocates_only_local_shards(world, tmp_path):
    cases = [
        (name, [*BASE, *variant, *layout, *MODEL, f"run.dir={tmp_path / name}"])
        for name, w, layout, variant in LAYOUTS
        if w == world
    ]
    out = tmp_path / "results.json"
    spawn(_rank, (world, free_port(), cases, str(out)), world)
    results = json.loads(out.read_text())
    for name, _ in cases:
        r = results[name]
        for rank, (largest, op, shape, shard) in enumerate(r["ranks"]):
            assert largest >= shard, f"{name}: rank {rank} recorded less than its own shards ({largest} < {shard})"
            assert largest <= r["bound"], (
                f"{name}: rank {rank} created {op} of shape {shape} ({largest} elements) at start-up, more than the "
                f"largest local shard plus one expert matrix ({r['bound']})"
            )
        assert not r["mismatched"], f"{name}: initial parameters differ from one process's: {r['mismatched']}"


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_startup_benchmark_prints_ratios_to_one_process():
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "startup.py"), "--quick"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if re.match(r"(single|ep2) ", line)}
    assert rows.keys() == {"single", "ep2"}, proc.stdout
    numbers = [float(x) for x in rows["single"][2:]]
    assert len(numbers) == 8 and numbers[1::2] == [1.0] * 4, rows["single"]  # value, ratio per column
    assert all(float(x) > 0 for x in rows["ep2"][2:]), rows["ep2"]
