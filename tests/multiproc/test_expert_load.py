"""Expert-load tracker: derived figures by hand, warnings, and expert_load.jsonl equal across layouts.

The multi-process cases train the debug model (capacity drops and aux-free bias on) for 3 steps on 2 gloo
ranks, expert-parallel and pipeline-parallel, and compare rank 0's expert_load.jsonl with the one a single
process writes: same tokens routed and dropped per layer and expert, same router probabilities and bias, every
layer present (pipeline stages hold different layers), and per-EP-rank tokens received that add up to the
kept tokens of that rank's experts. They also check the sampled step timed the layout's collectives.
Run: .venv/bin/pytest -q tests/multiproc/test_expert_load.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moeyard.job.compose import compose
from moeyard.profiling.expert_load import ExpertLoadTracker, derive
from moeyard.train.trainer import Trainer
from tests.helpers import free_port, run_layout

BASE = [
    "model=debug",
    "train.steps=3",
    "train.batch_size=8",
    "train.seq_len=32",
    "train.micro_batches=2",
    "train.eval_every=0",
    "profiling.progress=false",
    "profiling.breakdown_every=3",
    "train.log_every=1",
    "moe.capacity_factor=1.0",
    "moe.bias_update_rate=0.01",
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_derived_figures_by_hand() -> None:
    got = derive([4, 0, 2, 2], [3, 0, 2, 2])
    assert got["imbalance"] == 2.0  # max 4 / mean 2
    assert math.isclose(got["cv"], math.sqrt(2) / 2)  # population std sqrt((4+4+0+0)/4) over mean 2
    assert got["dead"] == [1]
    assert got["drop_rate"] == 1 / 8


def make_tracker(tmp_path: Path, dead_steps: int = 2, imbalance_warn: float = 3.0) -> ExpertLoadTracker:
    cfg = compose(["model=debug", "model.n_layers=1", "moe.num_experts=4"])
    return ExpertLoadTracker(
        cfg.model,
        cfg.moe,
        torch.device("cpu"),
        ep=1,
        ep_rank=0,
        run_dir=tmp_path,
        dead_steps=dead_steps,
        imbalance_warn=imbalance_warn,
    )


def one_forward(routed: list[int]) -> dict[str, list[dict[str, torch.Tensor]]]:
    counts = torch.tensor(routed)
    return {
        "0": [
            {
                "routed": counts,
                "kept": counts,
                "mean_prob": torch.full((4,), 0.25),
                "received": counts,
                "entropy": torch.tensor(1.0),
            }
        ]
    }


def test_warnings_for_dead_experts_and_imbalance(tmp_path: Path, capsys) -> None:
    tracker = make_tracker(tmp_path, dead_steps=2, imbalance_warn=3.0)
    bias = {"0": torch.zeros(4)}
    first = tracker.record(1, one_forward([8, 0, 4, 4]), bias)  # expert 1 dead once; imbalance 2
    second = tracker.record(2, one_forward([8, 0, 4, 4]), bias)  # dead twice in a row: warn once
    third = tracker.record(3, one_forward([14, 0, 1, 1]), bias)  # imbalance 3.5 > 3: warn
    fourth = tracker.record(4, one_forward([14, 0, 1, 1]), bias)  # still dead, still imbalanced: no repeats
    tracker.close()
    assert first["warnings"] == [] and fourth["warnings"] == []
    assert second["warnings"] == ["layer 0 expert 1 received no tokens for 2 logged steps"]
    assert len(third["warnings"]) == 1 and "imbalance (max/mean) 3.50" in third["warnings"][0]
    assert "expert 1 received no tokens" in capsys.readouterr().err
    lines = read_jsonl(tmp_path / "expert_load.jsonl")
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert lines[0]["layers"]["0"]["routed"] == [8, 0, 4, 4] and lines[0]["layers"]["0"]["dead"] == [1]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("single")
    Trainer(compose([*BASE, f"run.dir={run_dir}"])).fit()
    return read_jsonl(run_dir / "expert_load.jsonl")


def assert_same_load(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    for g, r in zip(got, ref, strict=True):
        assert g["layers"].keys() == r["layers"].keys() == {"0", "1", "2", "3"}
        for lid, layer in r["layers"].items():
            assert g["layers"][lid]["routed"] == layer["routed"]
            assert g["layers"][lid]["dropped"] == layer["dropped"]
            for key in ("mean_prob", "bias"):
                # fp32 rounding of a layout's sums (measured up to 1.6e-5 relative after 3 steps); a statistic
                # of the wrong tokens is off by orders of magnitude more.
                torch.testing.assert_close(
                    torch.tensor(g["layers"][lid][key]), torch.tensor(layer[key]), rtol=1e-4, atol=1e-6
                )
            assert math.isclose(g["layers"][lid]["entropy"], layer["entropy"], rel_tol=1e-5)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_expert_parallel_load_equals_one_process(single, tmp_path: Path) -> None:
    run_layout([*BASE, "parallel.ep=2", f"run.dir={tmp_path}"], 2, str(tmp_path / "out.pt"), free_port())
    got = read_jsonl(tmp_path / "expert_load.jsonl")
    assert_same_load(got, single)
    assert sum(sum(layer["dropped"]) for layer in single[0]["layers"].values()) > 0  # capacity really dropped
    for rec in got:
        for layer in rec["layers"].values():
            kept = [r - d for r, d in zip(layer["routed"], layer["dropped"], strict=True)]
            assert layer["received"] == [sum(kept[:4]), sum(kept[4:])]  # experts 0-3 on ep rank 0, 4-7 on 1
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert "comm_all_to_all_ms" not in metrics[1]  # step 2 is not sampled
    assert metrics[2]["comm_all_to_all_ms"] > 0 and metrics[2]["comm_all_reduce_ms"] > 0


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_pipeline_stages_load_reaches_rank0(single, tmp_path: Path) -> None:
    run_layout([*BASE, "parallel.pp=2", f"run.dir={tmp_path}"], 2, str(tmp_path / "out.pt"), free_port())
    assert_same_load(read_jsonl(tmp_path / "expert_load.jsonl"), single)
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert metrics[2]["comm_send_recv_ms"] > 0 and metrics[2]["time_forward_backward_ms"] > 0
