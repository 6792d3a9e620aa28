"""Checkpoint mechanics in one process: atomic step_N directories, keep-last-K, which directory counts as
the latest complete save, integrity checks (truncated files, corrupt or code-carrying metadata), a
save/load round trip of parameters, expert biases, AdamW state and the RNG, and when a run saves by default.
Run: .venv/bin/pytest -q tests/unit/test_checkpoint.py
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from moeyard.job.compose import compose
from moeyard.parallel import checkpoint as ckpt
from moeyard.train.checkpointing import CheckpointConfig
from moeyard.train.optim import build_optimizer
from moeyard.train.trainer import Trainer
from tests.helpers import TINY


def copy_checkpoint(src: Path, root: Path, name: str, seq: int, complete: bool) -> Path:
    """A copy of the real checkpoint `src` as root/name, saved as the seq-th save, sealed or not."""
    path = shutil.copytree(src, root / name)
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "seq": seq}))
    if not complete:
        (path / "COMPLETE").unlink()
    return path


def resolved(spec: str, run_dir: str | Path) -> Path | None:
    found = ckpt.resolve(spec, run_dir, "train.resume")
    return None if found is None else found[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """Five steps saving every step, keeping two."""
    run = tmp_path_factory.mktemp("run")
    trainer = Trainer(
        compose(
            [
                *TINY,
                "train.steps=5",
                f"run.dir={run}",
                "checkpoint.enabled=true",
                "checkpoint.every=1",
                "checkpoint.keep=2",
            ]
        )
    )
    trainer.fit()
    return trainer


def test_saves_are_complete_and_only_the_last_k_remain(trained: Trainer) -> None:
    root = Path(trained.cfg.run.dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_4", "step_5"]
    seqs = []
    for step in (4, 5):
        meta = ckpt.read_meta(root / f"step_{step}", "test")
        assert meta["step"] == step and meta["world_size"] == 1 and meta["optimizer"]
        assert set(meta["files"]) == {".metadata", "__0_0.distcp"}
        seqs.append(meta["seq"])
    assert seqs == [4, 5]
    assert resolved("auto", trained.cfg.run.dir) == root / "step_5"


@pytest.fixture
def saved(trained: Trainer) -> Path:
    return Path(trained.cfg.run.dir) / "checkpoints" / "step_5"


def test_only_complete_directories_count(saved: Path, tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    done = copy_checkpoint(saved, root, "step_2", 1, complete=True)
    torn = copy_checkpoint(saved, root, "step_4", 2, complete=False)
    tmp = copy_checkpoint(saved, root, "step_6.tmp", 3, complete=True)
    assert resolved("auto", tmp_path) == done
    assert resolved(str(tmp_path), "elsewhere") == done
    assert resolved("none", tmp_path) is None
    for path in (torn, tmp):
        with pytest.raises(ckpt.CheckpointError, match="incomplete checkpoint"):
            ckpt.resolve(str(path), tmp_path, "train.resume")
    with pytest.raises(ckpt.CheckpointError, match="holds no complete checkpoint"):
        ckpt.resolve(str(tmp_path / "nothing"), tmp_path, "train.resume")
    assert resolved("auto", tmp_path / "empty") is None


def test_latest_means_most_recently_saved(saved: Path, tmp_path: Path) -> None:
    """A run resumed from an older step and saved again: its new save wins over a higher abandoned step."""
    root = tmp_path / "checkpoints"
    copy_checkpoint(saved, root, "step_6", 2, complete=True)
    newest = copy_checkpoint(saved, root, "step_3", 3, complete=True)
    assert resolved("auto", tmp_path) == newest


def test_auto_resume_says_which_newer_checkpoints_it_skipped(saved: Path, tmp_path: Path) -> None:
    """resume=auto never passes over a newer save silently: each skipped one is named with its reason."""
    root = tmp_path / "checkpoints"
    oldest = copy_checkpoint(saved, root, "step_2", 1, complete=True)
    truncated = copy_checkpoint(saved, root, "step_4", 2, complete=True)
    (truncated / "__0_0.distcp").write_bytes(b"x")
    garbled = copy_checkpoint(saved, root, "step_6", 3, complete=True)
    (garbled / "meta.json").write_text("{not json")
    notes: list[str] = []
    path, meta = ckpt.resolve("auto", tmp_path, "train.resume", on_skip=notes.append)
    assert path == oldest and meta["seq"] == 1
    assert len(notes) == 2
    assert f"skipped {garbled}: meta.json is missing or corrupt" in notes[0]
    assert f"skipped {truncated}" in notes[1] and "__0_0.distcp has 1 bytes" in notes[1]


def test_truncated_and_corrupt_files_are_refused(trained: Trainer, tmp_path: Path) -> None:
    src = Path(trained.cfg.run.dir) / "checkpoints" / "step_5"
    truncated = shutil.copytree(src, tmp_path / "truncated")
    shard = truncated / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match=r"__0_0.distcp has 1000 bytes"):
        ckpt.read_meta(truncated, "train.resume")
    corrupt = shutil.copytree(src, tmp_path / "corrupt")
    size = (corrupt / ".metadata").stat().st_size
    (corrupt / ".metadata").write_bytes(b"\x00" * size)
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata is unreadable"):
        ckpt.read_meta(corrupt, "train.resume")


def test_metadata_that_would_run_code_is_refused(trained: Trainer, tmp_path: Path) -> None:
    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    bad = shutil.copytree(Path(trained.cfg.run.dir) / "checkpoints" / "step_5", tmp_path / "bad")
    (bad / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    meta = json.loads((bad / "meta.json").read_text())
    meta["files"][".metadata"] = (bad / ".metadata").stat().st_size
    (bad / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="is not allowed in checkpoint metadata"):
        ckpt.read_meta(bad, "train.resume")
    assert not (tmp_path / "pwned").exists()


def test_zero_optimizer_state_has_adamws_structure(trained: Trainer) -> None:
    """init_optimizer_state creates what AdamW's first step creates: same keys, shapes, dtypes, devices."""
    real = build_optimizer(trained.pm.named_parameters(), trained.cfg.optim, trained.device)
    for _, p in trained.pm.named_parameters():
        p.grad = torch.zeros_like(p)
    real.step()
    for _, p in trained.pm.named_parameters():
        p.grad = None
    made = build_optimizer(trained.pm.named_parameters(), trained.cfg.optim, trained.device)
    ckpt.init_optimizer_state(made)
    for p, state in real.state.items():
        other = made.state[p]
        assert state.keys() == other.keys()
        for key, value in state.items():
            assert (value.shape, value.dtype, value.device) == (other[key].shape, other[key].dtype, other[key].device)


def test_load_restores_parameters_biases_optimizer_and_rng(trained: Trainer, tmp_path: Path) -> None:
    torch.manual_seed(123)
    path = ckpt.save(trained.pm, trained.optimizer, 99, tmp_path / "ck", 1, trained.checkpointer.meta())
    after_save = torch.rand(4)
    fresh = Trainer(compose([*TINY, f"run.dir={tmp_path / 'fresh'}"]))
    torch.manual_seed(7)
    ckpt.load(fresh.pm, fresh.optimizer, path, ckpt.read_meta(path, "train.resume"), "train.resume")
    assert torch.equal(torch.rand(4), after_save)  # the RNG continues where the saved rank left it
    for (name, p), (_, q) in zip(trained.pm.named_parameters(), fresh.pm.named_parameters(), strict=True):
        assert torch.equal(p, q), name
        for key, value in trained.optimizer.state[p].items():
            assert torch.equal(value, fresh.optimizer.state[q][key]), (name, key)
    for lid, moe in trained.pm.moe_layers().items():
        assert moe.router.expert_bias.abs().sum() > 0
        assert torch.equal(moe.router.expert_bias, fresh.pm.moe_layers()[lid].router.expert_bias)


def test_every_torch_load_is_weights_only() -> None:
    """Safety: no code path of ours unpickles arbitrary objects (DCP metadata goes through the allow-list)."""
    repo = Path(__file__).resolve().parents[2]
    offenders = []
    for package in ("moe", "parallel", "launch", "profiling", "tests", "benchmarks"):
        for path in (repo / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                    continue
                owner = getattr(node.func.value, "id", "")
                weights_only = any(
                    k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in node.keywords
                )
                if (owner, node.func.attr) == ("torch", "load") and not weights_only:
                    offenders.append(f"{path.relative_to(repo)}:{node.lineno}")
                if owner == "pickle" and node.func.attr in ("load", "loads"):
                    offenders.append(f"{path.relative_to(repo)}:{node.lineno}")
    assert not offenders


@pytest.mark.parametrize(
    ("overrides", "steps", "init_from", "enabled", "every"),
    [
        ({}, 20, None, False, 10),  # a smoke test or CI run: nothing written
        ({}, 21, None, True, 10),
        ({}, 200, None, True, 20),  # a tenth of the run
        ({}, 100_000, None, True, 1000),  # never more than 1000 steps lost
        ({}, 5, "hf_dir", True, 10),  # a fine-tune is always saved (at its end here)
        ({"enabled": False}, 200, "hf_dir", False, 20),  # unless the user says no
        ({"every": 3}, 6, None, True, 3),  # asking for a period turns saving on
        ({"enabled": True, "every": 0}, 6, None, True, 0),
    ],
)
def test_checkpointing_defaults(overrides: dict, steps: int, init_from: str | None, enabled: bool, every: int) -> None:
    c = CheckpointConfig(**overrides).resolved(steps, init_from)
    assert (c.enabled, c.every) == (enabled, every)


def test_a_run_that_never_saves_says_so_last(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Trainer(compose([*TINY, "train.steps=2", f"run.dir={tmp_path}"])).fit()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("moeyard: run ended at step 2 without a checkpoint (checkpoint.enabled=false;")
    assert not (tmp_path / "checkpoints").exists()
