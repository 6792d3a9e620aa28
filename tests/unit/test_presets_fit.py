"""The big GPU presets fit, checked on paper: `experiment=mixtral_8x7b_h100` (32 ranks) and
`experiment=deepseek_v3_h100` (256 ranks).

For each preset, the first and the last rank of every pipeline stage (different pp, dp, tp and ep positions)
are built in this process on the meta device under a fake process group (parallel/memory.py), and:

- per-rank model state (fp32 weights, gradients, AdamW moments: 16 B per element) plus FSDP's transient
  gathered copies (root unit and two blocks, 8 B per element under bf16) is at most 70 % of an 80 GB H100,
  leaving at least 24 GB for activations, the CUDA context and the allocator's fragmentation;
- the two ranks of a stage hold shards of identical shapes (so every rank of the stage holds the same: no
  FSDP shard is empty or doubled), and the elements summed over all ranks, each divided by the number of
  ranks holding a copy of it, equal the whole model's parameter count: nothing dropped, nothing counted twice;
- the builds create no tensor off the meta device larger than the rotary table.

`pytest -s` prints the figures (they are in the README). Run: .venv/bin/pytest -q -s tests/unit/test_presets_fit.py
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moeyard.job.compose import compose
from moeyard.launch.validate import validate
from moeyard.moe.model import Transformer
from moeyard.parallel.memory import local_numel, meta_rank, rank_memory, shard_count

GPU_BYTES = 80e9
"""An H100's 80 GB counted in decimal units: below the card's 80 GiB (85.9e9 B), a little extra margin."""
BUDGET = 0.70
"""Most of the GPU that model state and FSDP's transient copies may take; the rest is for activations."""
PRESETS = {"mixtral_8x7b_h100": 32, "deepseek_v3_h100": 256}
"""Experiment preset -> the world size its launcher asks for."""


class RealAllocations(TorchDispatchMode):
    """The largest tensor (elements) any op creates off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs its local ops, which come back through this mode
        out = func(*args, **(kwargs or {}))
        real = [t.numel() for t in tree_leaves(out) if type(t) is torch.Tensor and not t.is_meta]
        self.largest = max([self.largest, *real])
        return out


def _measure(preset: str) -> dict:
    cfg = compose([f"experiment={preset}", "run.dir=unused"])
    world = cfg.launcher.world_size()
    dims = validate(cfg, world)
    per_stage = dims.dp * dims.tp
    bf16 = cfg.train.dtype == "bf16"
    ranks = []
    for stage in range(dims.pp):
        for rank in (stage * per_stage, (stage + 1) * per_stage - 1):
            recorder = RealAllocations()
            with recorder, meta_rank(cfg.model, cfg.moe, cfg.parallel, world, rank, bf16) as pm:
                params = pm.named_parameters()
                memory = rank_memory(pm, bf16)
                # An element counts 1/copies, where copies = per_stage / shards ranks of the stage hold it.
                unique = sum(Fraction(local_numel(p) * shard_count(n, p, dims.ep), per_stage) for n, p in params)
                shapes = {n: tuple((p.to_local() if isinstance(p, DTensor) else p).shape) for n, p in params}
            ranks.append(
                dict(rank=rank, stage=stage, memory=memory, unique=unique, shapes=shapes, largest=recorder.largest)
            )
    with torch.device("meta"):
        total = sum(p.numel() for p in Transformer(cfg.model, cfg.moe).parameters())
    return dict(name=preset, cfg=cfg, world=world, dims=dims, ranks=ranks, total=total)


@pytest.fixture(scope="module", params=list(PRESETS))
def preset(request) -> dict:
    figures = _measure(request.param)
    dims = figures["dims"]
    print(f"\n{request.param}: {figures['world']} ranks, pp={dims.pp} dp={dims.dp} tp={dims.tp} ep={dims.ep}")
    row = "{:>5} {:>5} {:>14} {:>9} {:>9} {:>9} {:>9}".format
    print(row("rank", "stage", "params/rank", "state GB", "+FSDP GB", "total GB", "of 80 GB"))
    for r in figures["ranks"]:
        m = r["memory"]
        gb = [f"{b / 1e9:.1f}" for b in (m.state_bytes, m.transient_bytes, m.total_bytes)]
        print(row(r["rank"], r["stage"], f"{m.params:,}", *gb, f"{m.total_bytes / GPU_BYTES:.0%}"))
    return figures


def test_launcher_asks_for_the_intended_world(preset):
    assert preset["world"] == PRESETS[preset["name"]]


def test_model_state_leaves_room_for_activations(preset):
    for r in preset["ranks"]:
        assert r["memory"].total_bytes <= BUDGET * GPU_BYTES, (r["rank"], r["memory"].total_bytes / 1e9)


def test_ranks_of_a_stage_hold_the_same_shards(preset):
    first, last = preset["ranks"][0::2], preset["ranks"][1::2]
    for a, b in zip(first, last, strict=True):
        assert a["shapes"] == b["shapes"], (a["rank"], b["rank"])
        assert all(n > 0 for shape in a["shapes"].values() for n in shape), a["rank"]


def test_shards_over_all_ranks_make_up_the_model_once(preset):
    per_stage = preset["dims"].dp * preset["dims"].tp
    counted = sum(per_stage * r["unique"] for r in preset["ranks"][0::2])  # every rank of the stage alike
    assert counted == preset["total"]


def test_building_on_meta_allocates_nothing_model_sized(preset):
    m = preset["cfg"].model
    rope = m.max_seq_len * m.rope_dim  # the rotary table [S, R/2, 2], computed on the host
    assert max(r["largest"] for r in preset["ranks"]) <= rope
