"""Resharding: a checkpoint saved under tp2*ep2 (4 ranks, FSDP) at step 3 loads under ep4 (4 ranks), pp2
(2 ranks) and one process, and steps 4-6 give the losses of the uninterrupted tp2*ep2 run (fp32, 1e-5 rel).

The source layout has FSDP x TP DTensor parameters and expert shards wrapped over the ep axis, and the
targets hold none of those shardings, so model and AdamW state both go through DCP's resharding.
Run: .venv/bin/pytest -q tests/multiproc/test_reshard.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import TINY, free_port, run_layout
from tests.helpers import history_losses as losses

pytestmark = [pytest.mark.multiproc, pytest.mark.timeout(300)]
COMMON = [*TINY, "train.micro_batches=2"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """The uninterrupted tp2*ep2 run, which also saves its step-3 checkpoint."""
    out = tmp_path_factory.mktemp("tp2ep2")
    overrides = [
        *COMMON,
        "parallel.tp=2",
        "parallel.ep=2",
        "parallel.dp_mode=fsdp",
        f"run.dir={out}",
        "checkpoint.enabled=true",
        "checkpoint.every=3",
    ]
    result = run_layout(overrides, 4, str(out / "result.pt"), free_port())
    return out / "checkpoints" / "step_3", losses(result["history"])


@pytest.mark.parametrize(
    ("name", "world", "layout"),
    [
        ("ep4", 4, ["parallel.ep=4"]),
        ("pp2", 2, ["parallel.pp=2"]),
        ("single", 1, []),
    ],
)
def test_resume_under_another_layout(source, tmp_path: Path, name: str, world: int, layout: list[str]) -> None:
    step_3, expected = source
    meta = json.loads((step_3 / "meta.json").read_text())
    assert meta["layout"] == {"pp": 1, "dp": 2, "tp": 2, "ep": 2, "dp_mode": "fsdp"}
    overrides = [*COMMON, *layout, f"run.dir={tmp_path}", f"train.resume={step_3}"]
    result = run_layout(overrides, world, str(tmp_path / "result.pt"), free_port())
    assert [h["step"] for h in result["history"]] == [4, 5, 6]
    assert losses(result["history"]) == pytest.approx(expected[3:], rel=1e-5)
