"""Every preset (conf/ YAML or registered in Hydra's config store) composes, validates and builds; `moeyard
train --help` and `--cfg job` follow Hydra's conventions; the console script fails with one line, exit 2.

Small models are built for real and run a forward pass; the Mixtral-8x7B and DeepSeek-V3 shapes are built
on the meta device and their parameter counts checked against a formula. The table of bad inputs is
tests/unit/test_bad_inputs.py. Run: `.venv/bin/pytest -q tests/unit/test_config.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf

from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose, conf_dir, load_resolved, to_yaml, write_resolved
from moeyard.job.schema import ConfigError
from moeyard.launch.cli import group_options, main
from moeyard.launch.validate import validate
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.model import Transformer, init_weights

GROUPS = ("model", "moe", "optim", "data", "parallel", "launcher", "profiling", "experiment")
STORED = ConfigStore.instance().repo  # the model presets and routing recipes of moe/presets.py (job/presets.py)
PRESETS = [(g, p.stem) for g in GROUPS for p in sorted((conf_dir() / g).glob("*.yaml"))]
PRESETS += [(g, name.removesuffix(".yaml")) for g in GROUPS for name in sorted(STORED.get(g, {}))]
BIG = 100e6  # parameters; above this a model is built on the meta device only


def expected_params(m: ModelConfig, e: MoEConfig) -> int:
    """Parameter count from the config: embeddings, attention, norms, dense or MoE FFN per block."""
    attn = attention_params(m)
    dense = 3 * m.dim * m.ffn_hidden
    moe = m.dim * e.num_experts + 3 * m.dim * e.expert_hidden * (e.num_experts + e.num_shared_experts)
    moe += e.router_bias * e.num_experts + e.expert_biases * e.num_experts * (2 * e.expert_hidden + m.dim)
    blocks = sum(attn + 2 * m.dim + (moe if m.is_moe_layer(i) else dense) for i in range(m.n_layers))
    return m.vocab_size * m.dim * (1 if m.tie_embeddings else 2) + blocks + m.dim


def attention_params(m: ModelConfig) -> int:
    """Attention weights of one block: GQA (+ q/k/v biases, q/k norms) or MLA (projections + latent norms)."""
    if m.attention == "mla":
        qk, q = m.qk_nope_head_dim + m.qk_rope_head_dim, m.q_lora_rank
        query = m.dim * m.n_heads * qk if q == 0 else m.dim * q + q + q * m.n_heads * qk
        kv = m.dim * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        kv += m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + m.v_head_dim)
        return query + kv + m.n_heads * m.v_head_dim * m.dim
    qkv_width = m.head_dim * (m.n_heads + 2 * m.n_kv_heads)
    norms = {"none": 0, "head": 2 * m.head_dim, "full": m.head_dim * (m.n_heads + m.n_kv_heads)}[m.qk_norm]
    extras = m.o_bias * m.dim + m.attention_sinks * m.n_heads  # gpt-oss: o_proj bias, one sink per head
    return m.dim * qkv_width + m.qkv_bias * qkv_width + norms + m.n_heads * m.head_dim * m.dim + extras


def leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def assert_preset_applied(cfg, group: str, preset: str) -> None:
    """Every value the preset file (or stored preset) sets is in the composed config (experiments win over
    model presets)."""
    path = conf_dir() / group / f"{preset}.yaml"
    if path.exists():
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        at_root = "@package _global_" in path.read_text()
    else:
        node = STORED[group][f"{preset}.yaml"]
        values, at_root = OmegaConf.to_container(node.node), node.package == "_global_"
    values.pop("defaults", None)
    if not at_root:
        values = {group: values}
    composed = OmegaConf.structured(cfg)
    for key, value in leaves(values):
        if value != "???":
            assert OmegaConf.select(composed, key) == value, key


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("text") / "a.txt"
    src.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path_factory.mktemp("tokens")
    prepare([src], out)
    return out


def test_every_group_has_presets():
    found = {g for g, _ in PRESETS}
    assert found == set(GROUPS)
    assert {"debug", "demo", "mixtral_8x7b", "deepseek_v3"} <= {p for g, p in PRESETS if g == "model"}


@pytest.mark.parametrize("group, preset", PRESETS)
def test_preset_composes_validates_and_builds(group, preset, token_dir):
    overrides = [f"{group}={preset}", "run.dir=unused"]
    if (group, preset) == ("data", "tokens"):
        overrides.append(f"data.path={token_dir}")
    if (group, preset) == ("data", "blend"):
        overrides.append(f"data.blend=[{{path:{token_dir},weight:1}}]")
    cfg = compose(overrides)
    assert_preset_applied(cfg, group, preset)
    validate(cfg, cfg.launcher.world_size())
    count = expected_params(cfg.model, cfg.moe)
    if count > BIG:
        with torch.device("meta"):
            model = Transformer(cfg.model, cfg.moe)
        assert sum(p.numel() for p in model.parameters()) == count
        return
    model = Transformer(cfg.model, cfg.moe)
    init_weights(model, seed=0)
    assert sum(p.numel() for p in model.parameters()) == count
    logits = model(torch.randint(0, cfg.model.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, cfg.model.vocab_size) and torch.isfinite(logits).all()


def test_mixtral_shape_has_46_7_billion_parameters():
    cfg = compose(["model=mixtral_8x7b"])
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    total = sum(p.numel() for p in model.parameters())
    # 2 * 32000 * 4096 embeddings + 32 * (attention 41.9 M + 8 experts * 3 * 4096 * 14336 + router + norms).
    assert total == 46_702_792_704
    # Active per token: 2 of the 8 experts.
    expert = 3 * 4096 * 14336
    assert (total - 32 * 6 * expert) / 1e9 == pytest.approx(12.9, abs=0.05)


def test_deepseek_v3_shape():
    cfg = compose(["model=deepseek_v3"])
    m, e = cfg.model, cfg.moe
    assert (m.n_layers, m.first_dense_layers, e.num_experts, e.top_k, e.n_groups, e.topk_groups) == (
        61,
        3,
        256,
        8,
        8,
        4,
    )
    with torch.device("meta"):
        model = Transformer(m, e)
    assert sorted(int(i) for i in model.moe_layers()) == list(range(3, 61))
    assert sum(p.numel() for p in model.parameters()) == expected_params(m, e)
    validate(cfg, 1)


def test_experiment_overrides_model_and_train():
    cfg = compose(["experiment=cpu_demo"])
    assert cfg.model.name == "demo" and cfg.train.steps == 300 and cfg.train.seq_len == 128
    cfg = compose(["experiment=mixtral_8x7b_h100"])
    assert cfg.launcher.name == "slurm" and cfg.launcher.world_size() == 32
    dims = validate(cfg, 32)
    assert (dims.tp, dims.pp, dims.ep, dims.dp) == (2, 4, 8, 4)


def test_resolved_config_round_trips(tmp_path):
    cfg = compose(["model=demo", "moe=gshard", "train.steps=7", f"run.dir={tmp_path}"])
    path = write_resolved(cfg, tmp_path)
    back = load_resolved(path)
    assert back == cfg and to_yaml(back) == path.read_text()
    assert back.moe.capacity_factor == 2.0 and back.moe.drop_policy == "position"


@pytest.mark.parametrize("override", ["model.dimm=3", "model.dim=abc", "moe.capacity_factor=big", "nosuch.x=1"])
def test_mistyped_key_or_wrong_type_is_a_composition_error(override):
    with pytest.raises(HydraException):
        compose([override])


def test_appended_unknown_key_fails_validation():
    cfg = compose(["+model.dimm=3"])  # Hydra lets `+` add keys; validation rejects what the schema lacks
    with pytest.raises(ConfigError, match=r"^model\.dimm=3 is not a field of ModelConfig .*did you mean model\.dim"):
        validate(cfg, 1)


def test_console_script_bad_config_is_one_line_exit_2(moeyard, tmp_path):
    run_dir = tmp_path / "run"
    proc = moeyard("train", "moe.top_k=9", f"run.dir={run_dir}", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == ["moeyard: config error: moe.top_k=9 must be in [1, moe.num_experts=8]"]
    assert not run_dir.exists()  # nothing written, nothing launched


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_lists_usage_groups_and_options(flag, capsys):
    assert main(["train", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moeyard train")
    groups = group_options()
    assert set(GROUPS) <= set(groups) and {p for g, p in PRESETS} <= {o for g in groups.values() for o in g}
    for group, options in groups.items():
        assert f"\n{group}: {', '.join(options)}\n" in out
    assert "== Config ==" in out and "\nmodel:\n  name: debug\n" in out


@pytest.mark.parametrize("args", [["--cfg", "job"], ["--cfg=job"], ["-c", "job"]], ids=" ".join)
def test_train_cfg_job_prints_the_composed_config_and_starts_nothing(args, tmp_path, capsys):
    run_dir = tmp_path / "run"
    overrides = ["model=demo", "train.steps=7", f"run.dir={run_dir}"]
    assert main(["train", *overrides, *args]) == 0
    assert capsys.readouterr().out == to_yaml(compose(overrides))
    assert not run_dir.exists()


def test_unwritable_run_dir_is_one_line(moeyard, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = moeyard("train", f"run.dir={blocker}/run", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"moeyard: run.dir={blocker}/run: Not a directory (rule: must be a writable directory)"
    ]
