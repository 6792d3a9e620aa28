"""`moeyard generate RUN_DIR --prompt TEXT LAYOUT`: a checkpoint resharded into a layout of gloo ranks samples
what one process samples.

A tiny MoE trained 2 steps in one process saves a checkpoint. Its greedy continuation in one process
(`interop.generate`) equals the tokens `moeyard generate ... parallel.tp=2 parallel.ep=2
launcher.nproc_per_node=4` prints from 4 gloo ranks under torchrun (vocab-sharded logits, padded prefixes,
experts over an all-to-all), and a seeded temperature/top-p sample equals one process's under pp2·tp2·ep2
(the last stage's logits travel to rank 0, which picks and broadcasts). A layout that breaks a rule is one
line and exit 2, before any rank starts.

Run: .venv/bin/pytest -q tests/launchers/test_generate_layout.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from moeyard.interop.generate import BYTES, Sampling, generate, load_checkpoint_model
from moeyard.job.compose import compose, write_resolved
from moeyard.job.schema import ConfigError
from moeyard.launch.cli import main
from moeyard.launch.generate_job import layout_job
from moeyard.moe.config import ModelConfig, MoEConfig
from tests.helpers import make_trainer
from tests.unit.test_generate import LOGIT_AGREEMENT, smallest_margin

PROMPT = "def main(argv):"
NEW_TOKENS = 12
FOUR_RANKS = ["launcher=local", "launcher.nproc_per_node=4", "launcher.timeout_s=120"]
"""launcher.timeout_s bounds every collective: a mismatched one ends the ranks instead of hanging the test."""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run directory with the checkpoint of a debug model trained 2 steps (still far from its collapse onto
    one token, so that the continuation says something)."""
    run = tmp_path_factory.mktemp("generate_layout") / "run"
    overrides = ["model=debug", "train.steps=2", "train.batch_size=4", "train.seq_len=32", "train.eval_every=0"]
    cfg = compose([*overrides, "profiling=off", "checkpoint.enabled=true", f"run.dir={run}"])
    write_resolved(cfg, run)  # as `moeyard train` does: the run's config.yaml names its (byte) tokenizer
    make_trainer(cfg).fit()
    return run


def one_process(run: Path, sampling: Sampling) -> tuple[list[int], float]:
    """One process's tokens after PROMPT, and the smallest gap between the two best logits along them."""
    model, _, _ = load_checkpoint_model(run, "generate", torch.device("cpu"))
    ids = BYTES.encode(PROMPT)
    new = generate(model, ids, NEW_TOKENS, sampling)
    return new, smallest_margin(model, ids + new, NEW_TOKENS)


def layout_tokens(run: Path, capsys, layout: dict[str, int], *args: str) -> list[int]:
    """The tokens `moeyard generate --json` prints, after checking the ranks ran `layout`."""
    argv = ["generate", str(run), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--json", *args]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["layout"] == {"world_size": 4, **layout}
    return printed["tokens"]


@pytest.mark.timeout(240)
def test_greedy_in_tp2_ep2_equals_one_process(run, capsys):
    want, margin = one_process(run, Sampling())
    # Greedy equality is well posed only where the two best logits are further apart than layouts agree
    # (a layout's logits differ from one process's by fp32 rounding, well inside the HF agreement).
    assert margin > 10 * LOGIT_AGREEMENT
    assert len(set(want)) > 1, want  # a constant continuation would equal one process's for any layout
    layout = {"pp": 1, "dp": 2, "tp": 2, "ep": 2}
    got = layout_tokens(run, capsys, layout, "parallel.tp=2", "parallel.ep=2", *FOUR_RANKS)
    assert got == want


@pytest.mark.timeout(240)
def test_sample_in_pp2_tp2_ep2_equals_one_process(run, capsys):
    """The same seed draws the same tokens: a draw differs only where it falls within rounding of a boundary
    of the cumulative probabilities (odds about 1e-6 per token)."""
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=5)
    want, _ = one_process(run, sampling)
    args = ["--temperature", "1.0", "--top-p", "0.9", "--seed", "5", "parallel.pp=2", "parallel.tp=2"]
    got = layout_tokens(run, capsys, {"pp": 2, "dp": 1, "tp": 2, "ep": 2}, *args, "parallel.ep=2", *FOUR_RANKS)
    assert got == want


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["parallel.ep=3", *FOUR_RANKS], "parallel.ep=3 must divide dp x"),
        (["parallel.tp=8", "launcher.nproc_per_node=8"], "parallel.tp=8 must divide model.n_heads=4"),
        (["model.dim=32", *FOUR_RANKS], "generate: model.dim=32 is not a layout override"),
        (["launcher=slurm"], "generate: launcher.name=slurm (rule: generation starts its ranks on this machine"),
        (["parallel.tp=2", "parallel.typo=1"], "parallel.typo=1 is not a config field"),
    ],
)
def test_bad_layout_is_one_line_before_any_rank(run, capsys, overrides, line):
    assert main(["generate", str(run), "--prompt", PROMPT, *overrides]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and line in err, err


@pytest.mark.parametrize(
    ("model", "moe", "line"),
    [
        (ModelConfig(), MoEConfig(capacity_factor=1.25), "parallel.tp=2 with moe.capacity_factor=1.25"),
        (ModelConfig(), MoEConfig(router="expert_choice"), "parallel.tp=2 with moe.router=expert_choice"),
        (ModelConfig(max_seq_len=27), MoEConfig(), "27 tokens (prompt + --max-new-tokens), padded to 28"),
    ],
)
def test_layouts_that_padding_would_change_are_refused(model, moe, line):
    """Under tp a prefix is padded to a multiple of tp: refused where that would change the real positions'
    logits (a per-sequence capacity, expert choice) or pass the model's positions."""
    with pytest.raises(ConfigError, match=re.escape(line)):
        layout_job(["parallel.tp=2", "launcher.nproc_per_node=2"], model, moe, length=27)
