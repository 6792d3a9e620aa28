"""Bad input, table-driven: each case runs `moeyard` (in this process) and must exit non-zero with exactly
one line on stderr naming the problem, and leave the directory as it was: existing files (checkpoints
included) byte-identical, nothing new, no *.tmp.

Cases cover config values, layouts vs world size, missing/corrupt token files, wrong dtypes, truncated or
mismatched checkpoints, a checkpoint of another model, Hugging Face dirs and export targets.
Run: .venv/bin/pytest -q tests/unit/test_bad_inputs.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.train.trainer import Trainer
from tests.helpers import TINY

Setup = Callable[[Path], list[str]]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with a complete checkpoint (step_2) of the tiny model."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("trained")
    Trainer(
        compose([*TINY, "train.steps=2", "moe.bias_update_rate=0", f"run.dir={run}", "checkpoint.enabled=true"])
    ).fit()
    return run


def train(tmp: Path, *overrides: str) -> list[str]:
    return ["train", *TINY, f"run.dir={tmp / 'run'}", *overrides]


def tokens(tmp: Path, edit: Callable[[Path], None] = lambda d: None) -> str:
    """A prepared token directory, then `edit` applied to it."""
    (tmp / "text.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    prepare([tmp / "text.txt"], tmp / "tok")
    edit(tmp / "tok")
    return f"data.path={tmp / 'tok'}"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section][name] = value
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def copied_run(tmp: Path, run: Path) -> Path:
    return shutil.copytree(run, tmp / "run")


def checkpoint(tmp: Path, run: Path) -> Path:
    return copied_run(tmp, run) / "checkpoints" / "step_2"


def hf_dir(tmp: Path, **config) -> str:
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text(json.dumps(config))
    return str(tmp / "hf")


MIXTRAL = dict(
    model_type="mixtral",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    num_local_experts=8,
    num_experts_per_tok=2,
)

# (id, setup -> argv, text the one-line error must contain). Setups get (tmp dir, trained run dir).
CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("dim-not-divisible", lambda t, r: train(t, "model.dim=63"), "model.dim=63"),
    ("top_k-above-experts", lambda t, r: train(t, "moe.top_k=9"), "moe.top_k=9"),
    ("zero-steps", lambda t, r: train(t, "train.steps=0"), "train.steps=0"),
    ("negative-lr", lambda t, r: train(t, "optim.lr=-1"), "optim.lr=-1"),
    ("val-fraction", lambda t, r: train(t, "data.val_fraction=1.5"), "data.val_fraction=1.5"),
    ("seq-too-long", lambda t, r: train(t, "train.seq_len=1000"), "train.seq_len=1000"),
    ("wrong-type", lambda t, r: train(t, "train.steps=abc"), "train.steps"),
    ("unknown-key", lambda t, r: train(t, "train.bogus=1"), "train.bogus"),
    ("bad-choice", lambda t, r: train(t, "train.nonfinite=maybe"), "train.nonfinite=maybe"),
    ("keep-zero", lambda t, r: train(t, "checkpoint.keep=0"), "checkpoint.keep=0"),
    ("every-negative", lambda t, r: train(t, "checkpoint.enabled=true", "checkpoint.every=-1"), "checkpoint.every=-1"),
    ("every-without-enabled", lambda t, r: train(t, "checkpoint.every=5"), "checkpoint.enabled=true"),
    ("tp-vs-one-process", lambda t, r: train(t, "parallel.tp=2"), "parallel."),
    (
        "ep-not-dividing-dp",
        lambda t, r: train(t, "launcher=torchrun", "launcher.nproc_per_node=4", "parallel.ep=3"),
        "parallel.ep=3",
    ),
    (
        "pp-too-many-stages",
        lambda t, r: train(t, "launcher=torchrun", "launcher.nproc_per_node=2", "parallel.pp=2", "model.n_layers=1"),
        "model.n_layers=1",
    ),
    ("missing-token-dir", lambda t, r: train(t, "data=tokens", f"data.path={t / 'none'}"), "data.path="),
    (
        "corrupt-token-meta",
        lambda t, r: train(t, "data=tokens", tokens(t, lambda d: (d / "meta.json").write_text("{"))),
        "meta.json is corrupt",
    ),
    (
        "truncated-tokens",
        lambda t, r: train(t, "data=tokens", tokens(t, lambda d: (d / "tokens.bin").write_bytes(b"ab"))),
        "tokens.bin",
    ),
    (
        "float-token-dtype",
        lambda t, r: train(t, "data=tokens", tokens(t, lambda d: edit_json(d / "meta.json", dtype="float32"))),
        "dtype=float32",
    ),
    (
        "vocab-too-large",
        lambda t, r: train(t, "data=tokens", tokens(t, lambda d: edit_json(d / "meta.json", vocab_size=50000))),
        "vocab_size=50000",
    ),
    ("resume-missing", lambda t, r: train(t, f"train.resume={t / 'nowhere'}"), "holds no complete checkpoint"),
    ("resume-unsealed", lambda t, r: train(t, f"train.resume={_unseal(checkpoint(t, r))}"), "incomplete checkpoint"),
    ("resume-truncated-shard", lambda t, r: train(t, f"train.resume={_truncate(checkpoint(t, r))}"), "bytes"),
    (
        "resume-corrupt-meta",
        lambda t, r: train(t, f"train.resume={_corrupt_meta(checkpoint(t, r))}"),
        "meta.json is missing or corrupt",
    ),
    (
        "resume-corrupt-dcp-metadata",
        lambda t, r: train(t, f"train.resume={_corrupt_dcp(checkpoint(t, r))}"),
        ".metadata is unreadable",
    ),
    (
        "resume-other-model",
        lambda t, r: (checkpoint(t, r), train(t, "train.resume=auto", "model.dim=128"))[1],
        "model.dim=64",
    ),
    (
        "resume-other-experts",
        lambda t, r: (checkpoint(t, r), train(t, "train.resume=auto", "moe.num_experts=4"))[1],
        "moe.num_experts=8",
    ),
    ("init-from-missing", lambda t, r: train(t, f"train.init_from={t / 'nowhere'}"), "train.init_from="),
    ("init-from-llama", lambda t, r: train(t, f"train.init_from={hf_dir(t, model_type='llama')}"), "model_type=llama"),
    (
        "init-from-other-shape",
        lambda t, r: train(t, f"train.init_from={hf_dir(t, **{**MIXTRAL, 'hidden_size': 96})}"),
        "model.dim=96",
    ),
    (
        "export-sigmoid-router",
        lambda t, r: [
            "export",
            str(_edit_ckpt_meta(checkpoint(t, r), moe__router="sigmoid_topk")),
            "--out",
            str(t / "out"),
        ],
        "moe.router=sigmoid_topk",
    ),
    (
        "export-no-topk-norm",
        lambda t, r: [
            "export",
            str(_edit_ckpt_meta(checkpoint(t, r), moe__norm_topk_prob=False)),
            "--out",
            str(t / "out"),
        ],
        "moe.norm_topk_prob=False",
    ),
    ("export-into-nonempty", lambda t, r: ["export", str(checkpoint(t, r)), "--out", str(_nonempty(t))], "--out="),
    ("export-nothing", lambda t, r: ["export", str(t), "--out", str(t / "out")], "holds no complete checkpoint"),
    ("import-without-config", lambda t, r: ["import", str(t)], "config.json is missing"),
]


def _unseal(step: Path) -> Path:
    (step / "COMPLETE").unlink()
    return step


def _truncate(step: Path) -> Path:
    shard = step / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    return step


def _corrupt_meta(step: Path) -> Path:
    (step / "meta.json").write_text("not json")
    return step


def _corrupt_dcp(step: Path) -> Path:
    size = (step / ".metadata").stat().st_size
    (step / ".metadata").write_bytes(b"\x80" * size)
    return step


def _edit_ckpt_meta(step: Path, **changes) -> Path:
    edit_json(step / "meta.json", **changes)
    return step


def _nonempty(tmp: Path) -> Path:
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return tmp / "out"


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_table_has_enough_cases() -> None:
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("setup", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(
    setup, expected: str, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = setup(tmp_path, trained_run)
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(lines) == 1, lines
    assert expected in lines[0], lines[0]
    assert snapshot(tmp_path) == before
    assert not [p for p in tmp_path.rglob("*.tmp")]
