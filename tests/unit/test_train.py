"""Training through the CLI on the embedded stdlib corpus: the loss falls, metrics and config are written,
runs are bitwise repeatable, and gradient accumulation trains like one big batch.

Each run is `moeyard train ...` in a subprocess on CPU. Run: `.venv/bin/pytest -q tests/unit/test_train.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeyard.job.compose import load_resolved

COMMON = ["model=debug", "profiling.progress=false", "data.max_files=60", "train.log_every=1"]
SHORT = [
    *COMMON,
    "train.steps=8",
    "train.batch_size=8",
    "train.seq_len=32",
    "train.eval_every=0",
    "optim.warmup_steps=2",
]


def train(moeyard, run_dir: Path, *overrides: str) -> list[dict]:
    # The timeout only guards against a hang: on an idle 2-core machine a run takes a few seconds.
    proc = moeyard("train", *overrides, f"run.dir={run_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_loss_falls_and_writes_metrics(moeyard, tmp_path):
    run = tmp_path / "run"
    steps = 40
    history = train(moeyard, run, *COMMON, f"train.steps={steps}", "train.batch_size=8", "train.seq_len=64",
                    "train.eval_every=20")  # fmt: skip
    assert [m["step"] for m in history] == list(range(1, steps + 1))
    for m in history:
        assert {"step", "loss", "aux_loss", "z_loss", "lr", "tokens_per_s"} <= m.keys()
        assert m["tokens_per_s"] > 0 and m["aux_loss"] > 0 and m["z_loss"] > 0
    first, last5 = history[0]["loss"], sum(m["loss"] for m in history[-5:]) / 5
    # Bytes start near ln(256) = 5.55 nats; 40 steps of the debug model learn Python's byte statistics.
    assert first > 5.0
    assert last5 < first - 1.0, [round(m["loss"], 3) for m in history]
    assert "eval_loss" in history[19] and "eval_loss" in history[-1]
    assert history[-1]["eval_loss"] < first - 1.0
    cfg = load_resolved(run / "config.yaml")
    assert cfg.train.steps == steps and cfg.model.name == "debug" and cfg.run.dir == str(run)


@pytest.fixture(scope="module")
def short_runs(moeyard, tmp_path_factory) -> dict[str, list[dict]]:
    """Three short runs: two identical ones and one with 2 micro-batches."""
    root = tmp_path_factory.mktemp("short")
    # The Switch aux loss is defined per micro-batch (its load fractions come from the micro-batch's own
    # routing), so accumulation can only equal one big batch with moe.aux_loss_coef=0. Sequence-level aux
    # loss, z-loss and per-sequence capacity are unaffected by how the batch is split.
    base = [*SHORT, "moe.aux_loss_coef=0", "moe.seq_aux_loss_coef=0.01", "moe.capacity_factor=1.0"]
    return {
        "a": train(moeyard, root / "a", *base),
        "b": train(moeyard, root / "b", *base),
        "mb2": train(moeyard, root / "mb2", *base, "train.micro_batches=2"),
    }


def test_same_seed_is_bitwise_identical(short_runs):
    a, b = short_runs["a"], short_runs["b"]
    for key in ("loss", "aux_loss", "seq_aux_loss", "z_loss", "grad_norm"):
        assert [m[key] for m in a] == [m[key] for m in b], key


def test_gradient_accumulation_matches_one_batch(short_runs):
    one, two = short_runs["a"], short_runs["mb2"]
    assert len(one) == len(two) == 8
    assert one[-1]["loss"] < one[0]["loss"]
    for m1, m2 in zip(one, two, strict=True):
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5), m1["step"]
        assert m2["z_loss"] == pytest.approx(m1["z_loss"], rel=1e-5), m1["step"]
