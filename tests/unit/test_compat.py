"""The compatibility module: newer torch APIs where the installed torch has them, the 2.11 spelling where not.

Each case runs on the installed torch (CI runs this file under the newest and the oldest supported torch) and
again with the newer API taken away, so both branches run on either torch. The shipped code reaches the
newer APIs only through `moeyard.parallel.compat`.

    .venv/bin/pytest -q tests/unit/test_compat.py
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moeyard.parallel import compat

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("moe", "parallel", "profiling", "train", "interop", "job", "plan", "launch")
NEWER_THAN_OLDEST = re.compile(r"\b(all_gather_single|reduce_scatter_single|PipelineStage\()")
"""Names whose use needs a torch newer than 2.11: the 2.13 collectives, and PipelineStage's grads arguments
(so the stage is built in one place)."""


@pytest.fixture
def one_rank_group():
    """A one-process gloo group: enough to run a collective or build a pipeline stage on this torch."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _stage(group) -> torch.distributed.pipelining.PipelineStage:
    hidden = torch.empty(2, 3, 4, device="meta", requires_grad=True)
    return compat.pipeline_stage(
        torch.nn.Linear(4, 4),
        0,
        1,
        torch.device("cpu"),
        input_args=hidden,
        output_args=hidden,
        input_grads=(hidden,),
        output_grads=(hidden,),
        group=group,
    )


def test_pipeline_stage_builds_on_this_torch(one_rank_group) -> None:
    stage = _stage(one_rank_group)
    assert stage.is_first and stage.is_last


def test_pipeline_stage_leaves_out_the_grads_where_torch_has_no_such_arguments(monkeypatch, one_rank_group):
    """torch 2.11's PipelineStage signature: passing input_grads/output_grads there is a TypeError."""
    built = {}

    class Stage211:
        def __init__(self, submodule, stage_index, num_stages, device, input_args=None, output_args=None, group=None):
            built.update(input_args=input_args, output_args=output_args, group=group)

    monkeypatch.setattr(compat, "PipelineStage", Stage211)
    compat.stage_takes_grads.cache_clear()
    try:
        _stage(one_rank_group)
    finally:
        compat.stage_takes_grads.cache_clear()
    assert built["group"] is one_rank_group and built["output_args"].shape == (2, 3, 4)


@pytest.mark.parametrize("hide_newer", [False, True], ids=["installed", "2.11-names"])
def test_collectives_gather_and_scatter(monkeypatch, one_rank_group, hide_newer: bool) -> None:
    if hide_newer:
        monkeypatch.delattr(dist, "all_gather_single", raising=False)
        monkeypatch.delattr(dist, "reduce_scatter_single", raising=False)
    x = torch.arange(6.0)
    gathered, scattered = torch.zeros(6), torch.zeros(6)
    compat.all_gather_into(gathered, x)
    compat.reduce_scatter_into(scattered, x)
    assert torch.equal(gathered, x) and torch.equal(scattered, x)  # one rank: its own slice, its own sum


def test_newer_apis_are_reached_only_through_compat() -> None:
    uses = [
        f"{path.relative_to(REPO)}:{n}: {line.strip()}"
        for folder in SHIPPED
        for path in sorted((REPO / folder).rglob("*.py"))
        if path != REPO / "parallel" / "compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if NEWER_THAN_OLDEST.search(line)
    ]
    assert uses == []


def test_pyproject_states_the_oldest_torch_and_this_torch_meets_it() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (bound,) = [d for d in deps if re.match(r"torch\b", d)]
    assert bound == "torch>=2.11"
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 11)
