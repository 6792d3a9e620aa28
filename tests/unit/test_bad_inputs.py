"""Bad input, table-driven: each case runs `moeyard` in this process (`moeyard.launch.cli.main`) and must exit
2 with exactly one line on stderr naming the field or the file, and leave everything as it was: the run
directory (which holds a user's files before the command) and every other file byte-identical, nothing new.

Cases cover each config group's own rules, the rules across groups (layout vs world size, data vs vocabulary),
the command line itself, token files, checkpoints (truncated, unsealed, of another model), Hugging Face
directories (missing, of another shape, truncated or corrupt safetensors), export targets, `moeyard plan`'s
cluster, and a busy dashboard port. Run: .venv/bin/pytest -q tests/unit/test_bad_inputs.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moeyard.interop.hf import export
from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.train.trainer import Trainer
from tests.helpers import TINY


@dataclass(frozen=True)
class Made:
    """What the cases start from, made once per module."""

    run: Path
    """A run directory with a complete checkpoint (step_2) of the tiny model."""
    hf: Path
    """That checkpoint exported as a Hugging Face Mixtral directory (an index and several shards)."""
    port: int
    """A port that something on this machine listens on."""


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("trained")
    Trainer(
        compose([*TINY, "train.steps=2", "moe.bias_update_rate=0", f"run.dir={run}", "checkpoint.enabled=true"])
    ).fit()
    hf = tmp_path_factory.mktemp("hf") / "mixtral"
    export(run, hf)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield Made(run=run, hf=hf, port=busy.getsockname()[1])


def train(tmp: Path, *overrides: str) -> list[str]:
    return ["train", *TINY, f"run.dir={tmp / 'run'}", *overrides]


def torchrun(tmp: Path, *overrides: str) -> list[str]:
    """A two-rank torchrun job (launcher=torchrun starts 2 processes per node)."""
    return train(tmp, "launcher=torchrun", "launcher.nproc_per_node=2", *overrides)


def plan(*overrides: str) -> list[str]:
    return ["plan", "model=debug", *overrides]


def tokens(tmp: Path, edit: Callable[[Path], None] = lambda d: None) -> str:
    """A prepared (byte-token) directory, then `edit` applied to it."""
    (tmp / "text.txt").write_text("def f(x):\n    return x + 1\n" * 200)
    prepare([tmp / "text.txt"], tmp / "tok")
    edit(tmp / "tok")
    return f"data.path={tmp / 'tok'}"


def edit_json(path: Path, **changes) -> None:
    """Sets keys of a JSON file (`section__name` sets a nested key); a value of None deletes the key."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        node, key = (data[section], name) if name else (data, key)
        if value is None:
            del node[key]
        else:
            node[key] = value
    path.write_text(json.dumps(data))


def copied_run(tmp: Path, run: Path) -> Path:
    return shutil.copytree(run, tmp / "run")


def checkpoint(tmp: Path, run: Path) -> Path:
    return copied_run(tmp, run) / "checkpoints" / "step_2"


def hf_dir(tmp: Path, **config) -> str:
    (tmp / "hf").mkdir()
    (tmp / "hf" / "config.json").write_text(json.dumps(config))
    return str(tmp / "hf")


def damaged_hf(tmp: Path, hf: Path, damage: Callable[[Path], object]) -> Path:
    """A copy of the exported Hugging Face directory with `damage` applied to it."""
    copy = shutil.copytree(hf, tmp / "hf")
    damage(copy)
    return copy


def first_shard(hf: Path) -> Path:
    return sorted(hf.glob("*.safetensors"))[0]


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if keep is None else data[:keep])


def garble_header(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 16 + data[16:])


def _unseal(step: Path) -> Path:
    (step / "COMPLETE").unlink()
    return step


def _truncate_shard(step: Path) -> Path:
    truncate(step / "__0_0.distcp")
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


def _blocker(tmp: Path) -> Path:
    (tmp / "file").write_text("not a directory")
    return tmp / "file"


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

Setup = Callable[[Path, Made], list[str]]


def field(override: str, expected: str | None = None) -> tuple[str, Setup, str]:
    """A case of one bad `train` override whose line must contain `expected` (default: the override itself)."""
    return (override, lambda t, f: train(t, override), expected or override)


# (id, setup(tmp dir, made) -> argv, text the one line must contain).
CASES: list[tuple[str, Setup, str]] = [
    # The command line and composition.
    field("train.steps=abc", "train.steps"),
    field("model.dim=abc", "could not be converted to Integer"),
    field("train.bogus=1", "train.bogus"),
    field("model.dimm=3", "is not a config field"),
    field("+moe.topk=2", "did you mean moe.top_k"),
    field("+bogus=1", "bogus=1 is not a field of JobConfig"),
    field("model=gpt5", "model/gpt5"),
    ("unknown-flag", lambda t, f: train(t, "--verbose"), "--verbose is not an option"),
    ("cfg-hydra", lambda t, f: train(t, "--cfg", "hydra"), "--cfg hydra"),
    ("unwritable-run-dir", lambda t, f: ["train", *TINY, f"run.dir={_blocker(t)}/run"], "run.dir="),
    # model.*
    field("model.dim=63"),
    field("model.n_layers=0"),
    field("model.n_heads=0"),
    field("model.n_kv_heads=3", "model.n_kv_heads=3 must divide model.n_heads=4"),
    field("model.max_seq_len=0"),
    field("model.head_dim_override=3"),
    field("model.first_dense_layers=-1"),
    field("model.moe_every=0"),
    field("model.rope_theta=0", "model.rope_theta=0"),
    field("model.norm_eps=0", "model.norm_eps=0"),
    field("model.attn_impl=xformers"),
    ("mla-with-qk-norm", lambda t, f: train(t, "model.attention=mla", "model.qk_norm=head"), "model.qk_norm=head"),
    ("yarn-factor", lambda t, f: train(t, "model.rope_scaling=yarn", "model.yarn_factor=0.5"), "model.yarn_factor"),
    field("train.seq_len=1000", "train.seq_len=1000 must be <= model.max_seq_len=128"),
    # moe.*
    field("moe.top_k=9", "moe.top_k=9 must be in [1, moe.num_experts=8]"),
    field("moe.num_experts=0"),
    field("moe.expert_hidden=0"),
    field("moe.num_shared_experts=-1"),
    field("moe.capacity_factor=0", "moe.capacity_factor=0"),
    field("moe.n_groups=3"),
    field("moe.topk_groups=2"),
    ("top_k-beyond-groups", lambda t, f: train(t, "moe.n_groups=4", "moe.top_k=3"), "moe.top_k=3"),
    field("moe.aux_loss_coef=-1", "moe.aux_loss_coef=-1"),
    field("moe.z_loss_coef=-0.1"),
    field("moe.route_scale=0", "moe.route_scale=0"),
    field("moe.router=topk", "must be one of softmax_topk, sigmoid_topk, expert_choice"),
    field("moe.drop_policy=random", "must be one of probability, position"),
    field("moe.shared_expert_gate=true", "moe.shared_expert_gate=True"),
    (
        "shared-hidden-zero",
        lambda t, f: train(t, "moe.num_shared_experts=1", "moe.shared_expert_hidden=0"),
        "moe.shared_expert_hidden=0",
    ),
    ("grouped-mm-rows", lambda t, f: train(t, "moe.grouped_mm=on", "moe.expert_hidden=12"), "moe.grouped_mm=on"),
    # optim.*
    field("optim.lr=-1"),
    field("optim.min_lr_ratio=2", "optim.min_lr_ratio=2"),
    field("optim.warmup_steps=-1"),
    field("optim.weight_decay=-0.1"),
    field("optim.beta1=1", "optim.beta1=1"),
    field("optim.beta2=1.5"),
    field("optim.eps=0", "optim.eps=0"),
    field("optim.grad_clip=-1", "optim.grad_clip=-1"),
    field("optim.fused=maybe"),
    # train.*
    field("train.steps=0"),
    field("train.batch_size=0", "train.batch_size=0 must be >= 1"),
    field("train.batch_size=7", "train.batch_size=7 must be divisible by train.micro_batches=2"),
    field("train.micro_batches=0"),
    field("train.seq_len=1"),
    field("train.eval_every=-1"),
    field("train.eval_batches=0"),
    field("train.log_every=0"),
    field("train.nonfinite=maybe"),
    field("train.dtype=fp16"),
    field("train.upcycle_granularity=0"),
    field("train.upcycle_granularity=2", "needs train.upcycle=true"),
    field("train.upcycle=true", "train.upcycle=True needs train.init_from"),
    # data.* and the token ids against the vocabulary
    field("data.val_fraction=1.5"),
    field("data.max_files=0"),
    field("data.source=web"),
    ("tokens-without-path", lambda t, f: train(t, "data=tokens"), "data.path=None"),
    (
        "missing-token-dir",
        lambda t, f: train(t, "data=tokens", f"data.path={t / 'none'}"),
        "run `moeyard prepare` first",
    ),
    (
        "corrupt-token-meta",
        lambda t, f: train(t, "data=tokens", tokens(t, lambda d: (d / "meta.json").write_text("{"))),
        "meta.json is corrupt",
    ),
    (
        "truncated-tokens",
        lambda t, f: train(t, "data=tokens", tokens(t, lambda d: (d / "tokens.bin").write_bytes(b"ab"))),
        "tokens.bin",
    ),
    (
        "float-token-dtype",
        lambda t, f: train(t, "data=tokens", tokens(t, lambda d: edit_json(d / "meta.json", dtype="float32"))),
        "dtype=float32",
    ),
    (
        "tokenizer-vocab-above-model",
        lambda t, f: train(t, "data=tokens", tokens(t, lambda d: edit_json(d / "meta.json", vocab_size=50000))),
        "vocab_size=50000",
    ),
    (
        "vocab-below-tokens",
        lambda t, f: train(t, "data=tokens", tokens(t), "model.vocab_size=100"),
        "model.vocab_size=100",
    ),
    (
        "token-ids-above-vocab",  # no vocab_size recorded: the ids themselves are checked ('x' is 120)
        lambda t, f: train(
            t, "data=tokens", tokens(t, lambda d: edit_json(d / "meta.json", vocab_size=None)), "model.vocab_size=64"
        ),
        "model.vocab_size=64 must exceed the largest token id 120",
    ),
    (
        "stdlib-bytes-above-vocab",
        lambda t, f: train(t, "model.vocab_size=100"),
        "largest token id 255 of data.source=stdlib",
    ),
    # parallel.* and the layout against the world size
    field("parallel.tp=2", "parallel.pp*tp=2"),
    field("parallel.tp=0"),
    field("parallel.dp=2", "parallel.pp*dp*tp=1*2*1"),
    field("parallel.ac_every=0"),
    field("parallel.ep_chunks=0"),
    field("parallel.pp_stages_per_rank=0"),
    field("parallel.pp_stages_per_rank=2", "must be 1 for pp_schedule=1f1b"),
    field("parallel.dp_mode=zero3"),
    field("parallel.param_dtype=bf16", "parallel.param_dtype=bf16 needs train.dtype=bf16"),
    field("parallel.ep_overlap=shared", "needs parallel.ep > 1"),
    ("ep-not-dividing-dp", lambda t, f: torchrun(t, "parallel.ep=3"), "parallel.ep=3 must divide dp x tp = 2x1"),
    ("tp-beyond-world", lambda t, f: torchrun(t, "parallel.tp=4"), "parallel.pp*tp=4"),
    ("pp-too-many-stages", lambda t, f: torchrun(t, "parallel.pp=2", "model.n_layers=1"), "model.n_layers=1"),
    ("tp-not-dividing-vocab", lambda t, f: torchrun(t, "parallel.tp=2", "model.vocab_size=257"), "parallel.tp=2"),
    # profiling.*, checkpoint.*, launcher.*, cluster.*
    field("profiling.trace_active=0"),
    field("profiling.breakdown_ranks=[3]", "profiling.breakdown_ranks=[3]"),
    (
        "trace-rank-outside",
        lambda t, f: train(t, "profiling.torch_trace=true", "profiling.trace_ranks=[1]"),
        "profiling.trace_ranks=[1]",
    ),
    field("profiling.peak_tflops=0", "profiling.peak_tflops=0"),
    field("profiling.imbalance_warn=0.5"),
    field("checkpoint.keep=0"),
    field("checkpoint.every=-1"),
    (
        "every-with-saving-off",
        lambda t, f: train(t, "checkpoint.enabled=false", "checkpoint.every=5"),
        "needs checkpoint.enabled=true",
    ),
    field("launcher.timeout_s=0"),
    field("launcher.name=kubernetes"),
    field("cluster.gpu=h1000"),
    field("cluster.memory_gb=0", "cluster.memory_gb=0"),
    ("plan-unknown-gpu", lambda t, f: plan("cluster.gpu=h1000"), "cluster.gpu=h1000 must be one of"),
    ("plan-no-nodes", lambda t, f: plan("cluster.nodes=0"), "cluster.nodes=0"),
    ("plan-headroom", lambda t, f: plan("cluster.moe_headroom=0.5"), "cluster.moe_headroom=0.5"),
    ("plan-unknown-key", lambda t, f: plan("cluster.gpus=8"), "cluster.gpus"),
    # train.resume and train.init_from: checkpoints
    ("resume-empty", lambda t, f: train(t, "train.resume=''"), "train.resume="),
    ("resume-missing", lambda t, f: train(t, f"train.resume={t / 'nowhere'}"), "holds no complete checkpoint"),
    (
        "resume-unsealed",
        lambda t, f: train(t, f"train.resume={_unseal(checkpoint(t, f.run))}"),
        "incomplete checkpoint",
    ),
    (
        "resume-truncated-shard",
        lambda t, f: train(t, f"train.resume={_truncate_shard(checkpoint(t, f.run))}"),
        "__0_0.distcp",
    ),
    (
        "resume-corrupt-meta",
        lambda t, f: train(t, f"train.resume={_corrupt_meta(checkpoint(t, f.run))}"),
        "meta.json is missing or corrupt",
    ),
    (
        "resume-corrupt-dcp-metadata",
        lambda t, f: train(t, f"train.resume={_corrupt_dcp(checkpoint(t, f.run))}"),
        ".metadata",
    ),
    (
        "resume-other-model",
        lambda t, f: (checkpoint(t, f.run), train(t, "train.resume=auto", "model.dim=128"))[1],
        "model.dim=64",
    ),
    (
        "resume-other-experts",
        lambda t, f: (checkpoint(t, f.run), train(t, "train.resume=auto", "moe.num_experts=4"))[1],
        "moe.num_experts=8",
    ),
    ("init-from-missing", lambda t, f: train(t, f"train.init_from={t / 'nowhere'}"), "train.init_from="),
    # Hugging Face directories
    ("init-from-llama", lambda t, f: train(t, f"train.init_from={hf_dir(t, model_type='llama')}"), "model_type=llama"),
    (
        "init-from-other-shape",
        lambda t, f: train(t, f"train.init_from={hf_dir(t, **{**MIXTRAL, 'hidden_size': 96})}"),
        "model.dim=96",
    ),
    (
        "init-from-no-weights",
        lambda t, f: train(t, f"train.init_from={hf_dir(t, **MIXTRAL)}"),
        "has no model.safetensors.index.json",
    ),
    ("import-without-config", lambda t, f: ["import", str(t), f"run.dir={t / 'run'}"], "config.json is missing"),
    (
        "import-truncated-safetensors",
        lambda t, f: ["import", str(damaged_hf(t, f.hf, lambda d: truncate(first_shard(d)))), f"run.dir={t / 'run'}"],
        "model-00001-of-",
    ),
    (
        "import-safetensors-cut-in-header",
        lambda t, f: [
            "import",
            str(damaged_hf(t, f.hf, lambda d: truncate(first_shard(d), keep=5))),
            f"run.dir={t / 'run'}",
        ],
        "is truncated or corrupt",
    ),
    (
        "init-from-garbled-safetensors",
        lambda t, f: train(t, f"train.init_from={damaged_hf(t, f.hf, lambda d: garble_header(first_shard(d)))}"),
        "model-00001-of-",
    ),
    (
        "import-missing-shard",
        lambda t, f: ["import", str(damaged_hf(t, f.hf, lambda d: first_shard(d).unlink())), f"run.dir={t / 'run'}"],
        "model-00001-of-00004.safetensors is missing",
    ),
    (
        "import-corrupt-index",
        lambda t, f: [
            "import",
            str(damaged_hf(t, f.hf, lambda d: (d / "model.safetensors.index.json").write_text("{"))),
            f"run.dir={t / 'run'}",
        ],
        "model.safetensors.index.json is corrupt",
    ),
    # export, prepare, dashboard
    (
        "export-sigmoid-router",
        lambda t, f: [
            "export",
            str(_edit_ckpt_meta(checkpoint(t, f.run), moe__router="sigmoid_topk")),
            "--out",
            str(t / "out"),
        ],
        "moe.router=sigmoid_topk",
    ),
    (
        "export-no-topk-norm",
        lambda t, f: [
            "export",
            str(_edit_ckpt_meta(checkpoint(t, f.run), moe__norm_topk_prob=False)),
            "--out",
            str(t / "out"),
        ],
        "moe.norm_topk_prob=False",
    ),
    ("export-into-nonempty", lambda t, f: ["export", str(checkpoint(t, f.run)), "--out", str(_nonempty(t))], "--out="),
    ("export-nothing", lambda t, f: ["export", str(t), "--out", str(t / "out")], "holds no complete checkpoint"),
    ("prepare-missing-input", lambda t, f: ["prepare", str(t / "none.txt"), "--out", str(t / "tok")], "none.txt"),
    ("dashboard-busy-port", lambda t, f: ["dashboard", str(f.run), "--port", str(f.port)], "--port="),
    ("dashboard-not-a-dir", lambda t, f: ["dashboard", str(t / "nowhere")], "run_dir="),
]

USER_FILES = {"notes.md": b"my notes\n", "keep/data.bin": bytes(range(256))}
"""What the run directory holds before each command: a user's files, which nothing may touch."""


def populate(run_dir: Path) -> None:
    for name, data in USER_FILES.items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_bytes(data)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (directories too), with its file's sha256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def test_table_has_enough_distinct_cases() -> None:
    assert len(CASES) >= 70 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("setup", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(
    setup: Setup, expected: str, made: Made, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = setup(tmp_path, made)
    populate(tmp_path / "run")
    before, made_before = snapshot(tmp_path), snapshot(made.run)
    capsys.readouterr()
    rc = main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert expected in lines[0], lines[0]
    assert rc == 2
    assert snapshot(tmp_path) == before and snapshot(made.run) == made_before
