"""Hugging Face interop: `moeyard export` writes Mixtral safetensors + config.json that `transformers` loads
(MixtralForCausalLM, local files, CPU) with logits equal to ours; `train.init_from` / `moeyard import` read
them back bit for bit; configs outside the Mixtral family are refused naming the field.
Run: .venv/bin/pytest -q tests/multiproc/test_hf.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launch.cli import main
from launch.config import compose
from parallel.state import full_state_dict
from tests.helpers import TINY, free_port, run_layout
from train.trainer import Trainer

HF_TINY = [*TINY, "moe.bias_update_rate=0", "train.steps=2", "checkpoint.enabled=true"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    """Two trained steps (so weights are not just the init), exported through the CLI."""
    run = tmp_path_factory.mktemp("run")
    trainer = Trainer(compose([*HF_TINY, f"run.dir={run}"]))
    trainer.fit()
    out = run.parent / f"{run.name}-hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    return trainer, out


def test_export_loads_in_transformers_with_equal_logits(exported) -> None:
    from transformers import MixtralForCausalLM

    trainer, out = exported
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["num_local_experts"] == 8
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.1.block_sparse_moe.experts.7.w2.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    } <= names
    model, info = MixtralForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    model.eval()
    tokens, _ = trainer.data.batch(123, 4)
    with torch.no_grad():
        ours = trainer.pm.parts[0](tokens)
        theirs = model(input_ids=tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_init_from_hf_dir_reads_the_same_weights(exported, tmp_path: Path) -> None:
    trainer, out = exported
    imported = Trainer(compose([*HF_TINY, f"run.dir={tmp_path}", f"train.init_from={out}"]))
    assert imported.step == 0
    ours, back = full_state_dict(trainer.pm), full_state_dict(imported.pm)
    assert ours.keys() == back.keys()
    for name in ours:
        assert torch.equal(ours[name], back[name]), name


def test_moeyard_import_trains_from_the_weights(exported, tmp_path: Path) -> None:
    """The import command takes the shape from config.json; its first loss is the exported model's loss."""
    trainer, out = exported
    x, y = trainer.data.batch(0, trainer.cfg.train.batch_size)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(trainer.pm.parts[0](x).flatten(0, 1), y.flatten()).item()
    run = tmp_path / "imported"
    args = [
        "import",
        str(out),
        "train.steps=1",
        f"run.dir={run}",
        "data.max_files=20",
        "train.seq_len=32",
        "profiling=off",
        "train.eval_every=0",
        "model.max_seq_len=128",
    ]
    assert main(args) == 0
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(expected, rel=1e-6)


def test_non_mixtral_configs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "sigmoid"
    trainer = Trainer(compose([*HF_TINY, "moe=deepseek", "train.steps=1", f"run.dir={run}"]))
    trainer.fit()
    assert main(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "moe.router=sigmoid_topk" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


@pytest.mark.multiproc
@pytest.mark.timeout(180)
def test_init_from_hf_dir_under_expert_parallel_fsdp(exported, tmp_path: Path) -> None:
    """Every rank cuts its own shards (experts over ep, the rest over FSDP) from the safetensors."""
    trainer, out = exported
    x, y = trainer.data.batch(0, trainer.cfg.train.batch_size)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(trainer.pm.parts[0](x).flatten(0, 1), y.flatten()).item()
    overrides = [
        *HF_TINY,
        "train.steps=1",
        "checkpoint.enabled=false",
        "parallel.ep=2",
        "parallel.dp_mode=fsdp",
        f"train.init_from={out}",
        f"run.dir={tmp_path}",
    ]
    result = run_layout(overrides, 2, str(tmp_path / "result.pt"), free_port())
    assert result["history"][0]["loss"] == pytest.approx(expected, rel=1e-5)
