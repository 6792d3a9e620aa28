"""Blended data (`data=blend`, train/blend.py): the deterministic source schedule keeps every source within
ceil(log2(sources)) samples of its share on every prefix; batches are a pure function of (seed, step), rows
come from the source the schedule names, eval rows from each source's held-out tail; per-source token counts
reach the metrics; a run resumed mid-blend is bitwise the uninterrupted one; a missing, empty or zero-weight
source is refused by `moeyard train` in one line, exit 2, before the run starts.

Run: `.venv/bin/pytest -q tests/unit/test_blend.py` (about 20 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.train.blend import BlendData, cumulative_counts
from moeyard.train.data import TokenData
from moeyard.train.trainer import Trainer
from tests.helpers import TINY, history_losses

WEIGHT_SETS = [
    [0.7, 0.3],
    [1.0, 1.0, 1.0],
    [0.5, 0.25, 0.125, 0.0625, 0.0625],
    [0.001, 0.999],
    [3.0, 1e-4, 2.0, 0.37, 5.5, 1.0, 0.02],
]


@pytest.mark.parametrize("weights", WEIGHT_SETS)
def test_cumulative_counts_keep_every_prefix_within_the_split_depth(weights):
    """Counts sum to n, never go backwards (a step's share is never negative), and stay within the depth of
    the halving tree of n * weight: each split floors once, losing under one sample."""
    share = [Fraction(w) / sum(Fraction(x) for x in weights) for w in weights]
    bound = math.ceil(math.log2(len(weights)))
    before = [0] * len(weights)
    for n in range(0, 3000):
        counts = cumulative_counts(n, share)
        assert sum(counts) == n
        assert all(c >= b for c, b in zip(counts, before, strict=True))
        assert all(abs(c - n * w) < bound for c, w in zip(counts, share, strict=True)), (n, counts)
        before = counts
    big = 10**12 + 7  # a long run's sample index: exact arithmetic keeps the bound
    assert all(abs(c - big * w) < bound for c, w in zip(cumulative_counts(big, share), share, strict=True))


def _part(value: int, length: int, seq_len: int) -> TokenData:
    """A source whose train tokens are all `value` and held-out tokens all `value + 100`."""
    train, val = np.full(length, value, dtype=np.uint16), np.full(length // 4, value + 100, dtype=np.uint16)
    return TokenData(train=train, val=val, seq_len=seq_len, seed=7)


@pytest.fixture
def blend() -> BlendData:
    parts = [_part(1, 500, 8), _part(2, 300, 8), _part(3, 900, 8)]
    return BlendData(parts, [Fraction(0.5), Fraction(0.2), Fraction(0.3)], ["a", "b", "c"])


def test_rows_follow_the_schedule_and_are_a_function_of_seed_and_step(blend):
    batch_size, seen = 16, np.zeros(3, dtype=np.int64)
    for step in range(40):
        x, y = blend.batch(step, batch_size)
        assert x.shape == y.shape == (batch_size, 8)
        source = x[:, 0].numpy() - 1
        assert all((x[i] == x[i, 0]).all() and (y[i] == x[i, 0]).all() for i in range(batch_size))
        seen += np.bincount(source, minlength=3)
        assert seen.tolist() == cumulative_counts((step + 1) * batch_size, blend.weights)
        assert blend.source_tokens(step + 1, batch_size) == {
            f"source_tokens/{n}": int(c) * 8 for n, c in zip("abc", seen, strict=True)
        }
    again = BlendData(blend.parts, blend.weights, blend.names)
    for step in (39, 3, 17):  # any order, any instance
        for a, b in zip(blend.batch(step, batch_size), again.batch(step, batch_size), strict=True):
            assert torch.equal(a, b)
    first = blend.batch(0, batch_size)[0][:, 0]
    assert not torch.equal(first, first.sort().values), "rows are shuffled, not grouped by source"


def test_eval_rows_come_from_each_sources_held_out_tail(blend):
    x, _ = blend.eval_batch(0, 20)
    assert sorted(set(x[:, 0].tolist())) == [101, 102, 103]
    assert torch.equal(blend.eval_batch(3, 20)[0], blend.eval_batch(3, 20)[0])


def _prepared(root: Path, name: str, text: str) -> str:
    (root / f"{name}.txt").write_text(text)
    prepare([root / f"{name}.txt"], root / name)
    return str(root / name)


@pytest.fixture
def sources(tmp_path: Path) -> tuple[str, str]:
    return (
        _prepared(tmp_path, "prose", "The quick brown fox jumps over the lazy dog. " * 60),
        _prepared(tmp_path, "code", "def add(a, b):\n    return a + b\n" * 90),
    )


def test_resume_mid_blend_is_bitwise(tmp_path, sources):
    blend = ["data=blend", f"data.blend=[{{path:{sources[0]},weight:0.7}},{{path:{sources[1]},weight:0.3}}]"]
    full = Trainer(compose([*TINY, *blend, f"run.dir={tmp_path / 'full'}"]))
    full_history = full.fit()
    run = tmp_path / "cut"
    Trainer(compose([*TINY, *blend, f"run.dir={run}", "checkpoint.enabled=true", "train.steps=3"])).fit()
    resumed = Trainer(compose([*TINY, *blend, f"run.dir={run}", "train.resume=auto"]))
    assert resumed.step == 3
    resumed_history = resumed.fit()
    assert history_losses(resumed_history) == history_losses(full_history)[3:]
    counts = [{k: v for k, v in h.items() if k.startswith("source_tokens/")} for h in full_history]
    assert counts[3:] == [{k: v for k, v in h.items() if k.startswith("source_tokens/")} for h in resumed_history]
    # 6 steps x train.batch_size=8: floor(48 x 0.7) prose samples of train.seq_len=32 tokens, the rest code
    assert counts[-1] == {"source_tokens/prose": 33 * 32, "source_tokens/code": 15 * 32}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {k: v for k, v in logged[-1].items() if k.startswith("source_tokens/")} == counts[-1]


def test_blend_list_composes_from_the_command_line(sources):
    cfg = compose(["data=blend", f"data.blend=[{{path:{sources[0]},weight:0.7}},{{path:{sources[1]},weight:0.3}}]"])
    assert [(s.path, s.weight) for s in cfg.data.blend] == [(sources[0], 0.7), (sources[1], 0.3)]


@pytest.mark.parametrize(
    ("second", "weight", "message"),
    [
        ("missing", 0.3, "data.blend[1].path={root}/missing lacks meta.json or tokens.bin"),
        ("empty", 0.3, "data.blend[1].path={root}/empty: 1 tokens cannot hold train.seq_len=32"),
        ("code", 0.0, "data.blend[1].weight=0.0 must be > 0"),
    ],
)
def test_bad_source_is_refused_in_one_line_before_the_run(tmp_path, sources, capsys, second, weight, message):
    _prepared(tmp_path, "empty", "")  # just the separator: no window fits
    run = tmp_path / "run"
    blend = f"data.blend=[{{path:{sources[0]},weight:0.7}},{{path:{tmp_path / second},weight:{weight}}}]"
    assert main(["train", "model=debug", "train.seq_len=32", "data=blend", blend, f"run.dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(root=tmp_path) in err, err
    assert not run.exists()
