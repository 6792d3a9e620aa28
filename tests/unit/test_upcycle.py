"""train.upcycle: tiny random Hugging Face Llama and Qwen3 models (local configs, saved with save_pretrained)
are upcycled through the Trainer, and our step-0 logits equal the dense model's (fp32, 1e-4) for normalised
top-k softmax routing, with every expert a copy of the dense FFN (granularity 1) or a slice of it
(granularity 2 and 4, moe.route_scale = g; a dense first block keeps the dense FFN); the CLI trains two
steps from it; validation names the field that keeps a config from upcycling; two gloo ranks (ep2 with
FSDP, tp2 with sequence parallelism) read their own slices and start from the one-process weights bit for bit.
Run: .venv/bin/pytest -q tests/unit/test_upcycle.py  (the two-rank runs are marked multiproc)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeyard.interop.upcycle import dense_overrides, read_dense_config
from moeyard.job.compose import compose
from moeyard.job.schema import ConfigError
from moeyard.launch.cli import main
from moeyard.launch.validate import validate
from moeyard.parallel.state import full_state_dict
from tests.helpers import free_port, make_trainer, run_layout

SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)


def save_dense(path: Path, family: str, **changes):
    """A random dense model (norm weights near one, not ones, so that their mapping is tested), saved."""
    import transformers

    if family == "llama":
        config = transformers.LlamaConfig(**SHAPE, **changes)
        model = transformers.LlamaForCausalLM(config)
    else:  # a head width other than hidden/heads, tied embeddings, q/k norms
        config = transformers.Qwen3Config(**SHAPE, head_dim=32, tie_word_embeddings=True, **changes)
        model = transformers.Qwen3ForCausalLM(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
    # Llama in several files (the index path), Qwen3 in one model.safetensors.
    model.save_pretrained(path, max_shard_size="100KB" if family == "llama" else "50MB")
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def dense(request, tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, save_dense(path, request.param)


def overrides(hf_dir: Path, g: int, num_experts: int, top_k: int, run_dir: Path) -> list[str]:
    """A debug run upcycling `hf_dir`: the model shape from config.json, experts of width I/g."""
    hf = read_dense_config(hf_dir)
    fmt = lambda v: "null" if v is None else str(v).lower() if isinstance(v, bool) else v
    return [
        "model=debug",
        "train.log_every=1",
        *(f"{k}={fmt(v)}" for k, v in dense_overrides(hf).items()),
        f"moe.num_experts={num_experts}",
        f"moe.top_k={top_k}",
        f"moe.expert_hidden={hf['intermediate_size'] // g}",
        f"moe.route_scale={g}",
        "moe.router=softmax_topk",
        "moe.norm_topk_prob=true",
        f"train.init_from={hf_dir}",
        "train.upcycle=true",
        f"train.upcycle_granularity={g}",
        "train.seq_len=32",
        "train.batch_size=4",
        "train.steps=2",
        "train.eval_every=0",
        "data.max_files=20",
        "profiling=off",
        f"run.dir={run_dir}",
    ]


CASES = [(1, 4, 2, []), (2, 8, 4, []), (4, 8, 4, []), (2, 8, 4, ["model.first_dense_layers=1"])]


@pytest.mark.parametrize(("g", "num_experts", "top_k", "extra"), CASES, ids=["g1", "g2", "g4", "g2-dense-first"])
def test_step0_logits_equal_the_dense_models(
    dense, g: int, num_experts: int, top_k: int, extra: list[str], tmp_path: Path
) -> None:
    family, path, model = dense
    cfg = compose([*overrides(path, g, num_experts, top_k, tmp_path), *extra])
    validate(cfg, 1)
    trainer = make_trainer(cfg)
    assert trainer.step == 0
    ours_model = trainer.pm.parts[0]
    moe = ours_model.layers["1"].moe  # block 0 is dense in the dense-first case
    w1, router = moe.experts.w1.detach(), moe.router.gate.weight.detach()
    for e in range(num_experts):  # expert c*g + j is slice j of the dense FFN; copy c's g experts share a row
        torch.testing.assert_close(w1[e], w1[e % g], rtol=0, atol=0)
        torch.testing.assert_close(router[e], router[e - e % g], rtol=0, atol=0)
    if num_experts > g:
        assert not torch.equal(router[0], router[g])  # copies differ, so top-k picks whole copies
    x, _ = trainer.data.batch(0, 4)
    with torch.no_grad():
        ours, theirs = ours_model(x), model(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_cli_trains_two_steps_from_the_dense_model(dense, tmp_path: Path) -> None:
    """`moeyard train ... train.upcycle=true`: the first loss is the dense model's loss on that batch."""
    family, path, model = dense
    args = overrides(path, 2, 8, 4, tmp_path / "run")
    trainer = make_trainer(compose([*args[:-1], f"run.dir={tmp_path / 'batch'}"]))
    x, y = trainer.data.batch(0, 4)
    with torch.no_grad():
        want = F.cross_entropy(model(input_ids=x).logits.flatten(0, 1), y.flatten()).item()
    assert main(["train", *args]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert lines[0]["loss"] == pytest.approx(want, rel=1e-4)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    save_dense(path, "llama")
    return path


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8}


def test_yarn_dense_model_upcycles(tmp_path: Path) -> None:
    """A Qwen3 with YaRN RoPE (4x a pre-training context of 8, so 32-token rows use it) upcycles to the same
    step-0 logits; the same weights with plain RoPE are far off."""
    model = save_dense(tmp_path / "qwen3", "qwen3", rope_parameters=YARN)
    cfg = compose(overrides(tmp_path / "qwen3", 2, 8, 4, tmp_path / "run"))
    assert (cfg.model.rope_scaling, cfg.model.yarn_factor, cfg.model.yarn_original_max_seq_len) == ("yarn", 4.0, 8)
    validate(cfg, 1)
    trainer = make_trainer(cfg)
    x, _ = trainer.data.batch(0, 4)
    with torch.no_grad():
        ours, theirs = trainer.pm.parts[0](x), model(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    plain = compose([*overrides(tmp_path / "qwen3", 2, 8, 4, tmp_path / "plain"), "model.rope_scaling=none"])
    with pytest.raises(ConfigError, match="model.rope_scaling=none must be yarn"):
        validate(plain, 1)
    with torch.no_grad():  # the trainer itself does not validate: what plain RoPE would give
        assert (make_trainer(plain).pm.parts[0](x) - theirs).abs().max() > 1e-2


def test_llama3_rope_scaling_is_refused(tmp_path: Path) -> None:
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 64}
    llama3 |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    save_dense(tmp_path / "llama", "llama", rope_parameters=llama3)
    with pytest.raises(ValueError, match=r"rope_parameters.rope_type=llama3 \(rule: must be default or yarn"):
        read_dense_config(tmp_path / "llama")


BAD = [
    ("moe.expert_hidden=64", "moe.expert_hidden=64 x train.upcycle_granularity=4 must equal intermediate_size=128"),
    ("moe.num_experts=6", "moe.num_experts=6 must be divisible by train.upcycle_granularity=4"),
    ("moe.top_k=2", "moe.top_k=2 must be a multiple of 4"),
    ("moe.route_scale=1.0", "moe.route_scale=1.0 must be 4"),
    ("moe.num_shared_experts=1", "moe.num_shared_experts=1 must be 0"),
    ("model.rope_theta=500000.0", "model.rope_theta=500000.0 must be 10000.0"),
    ("train.upcycle=false", "train.upcycle=False must be true for train.init_from="),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_configs_that_cannot_upcycle_are_refused(llama: Path, override: str, message: str, tmp_path: Path) -> None:
    base = overrides(llama, 4, 8, 4, tmp_path)
    cfg = compose([*base, override, *(["train.upcycle_granularity=1"] if override == "train.upcycle=false" else [])])
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "layout",
    [["parallel.ep=2", "parallel.dp_mode=fsdp"], ["parallel.tp=2", "parallel.sequence_parallel=true"]],
    ids=["ep2-fsdp", "tp2-sp"],
)
def test_two_ranks_read_their_slices(llama: Path, layout: list[str], tmp_path: Path) -> None:
    """Each rank fills its shards (experts over ep, router rows over FSDP, heads over tp) from the dense files:
    the gathered weights are the one-process upcycled ones bit for bit."""
    base = [*overrides(llama, 2, 8, 4, tmp_path / "one"), "train.steps=1"]
    want = full_state_dict(make_trainer(compose(base)).pm)
    result = run_layout([*base, *layout, f"run.dir={tmp_path / 'two'}"], 2, str(tmp_path / "r.pt"), free_port())
    assert result["initial"].keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(result["initial"][name], value), name


def test_any_box_is_that_box_of_the_whole(llama: Path) -> None:
    """A shard's read (router rows cutting through a copy, expert columns, q rows inside a head) is exactly
    the box of the one-process tensor."""
    from moeyard.interop.hf import SafetensorsReader
    from moeyard.interop.upcycle import read_upcycled_part

    cfg = compose(overrides(llama, 4, 8, 4, llama / "unused"))
    reader = SafetensorsReader(llama)
    m, g = cfg.model, 4
    shapes = {
        "layers.1.moe.router.gate.weight": (8, 64),
        "layers.1.moe.experts.w1": (8, 64, 32),
        "layers.1.moe.experts.w2": (8, 32, 64),
        "layers.1.attention.wq.weight": (64, 64),
    }
    for name, shape in shapes.items():
        full = read_upcycled_part(name, torch.Size(shape), (0,) * len(shape), torch.Size(shape), reader.read, m, g, 3)
        offset, size = (3, 5, 7)[: len(shape)], (4, 9, 11)[: len(shape)]
        part = read_upcycled_part(name, torch.Size(shape), offset, torch.Size(size), reader.read, m, g, 3)
        box = tuple(slice(o, o + n) for o, n in zip(offset, size, strict=True))
        assert torch.equal(part, full[box]), name
    reader.close()
