"""Hugging Face interop: `moeyard export` writes Mixtral safetensors + config.json that `transformers` loads
(MixtralForCausalLM, local files, CPU) with logits equal to ours; `train.init_from` / `moeyard import` read
them back bit for bit, on one process, under ep2 FSDP and under tp2*pp2; `--dtype bfloat16` writes the fp32
weights rounded to bf16, which transformers runs close to our fp32 model; configs no family represents
are refused naming the field. Every family (tiny random transformers models, as in
tests/unit/test_hf_families.py, and gpt-oss's from tests/unit/test_gpt_oss.py) imports under tp2*ep2 (FSDP)
and under pp2 with the weights one process reads, bit for bit, and the same losses (Mixtral: the exported model
above).
Run: .venv/bin/pytest -q tests/multiproc/test_hf.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open

import moeyard.interop.hf as train_hf
from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.shards import shard_extent
from moeyard.parallel.state import full_state_dict
from moeyard.train.trainer import Trainer
from tests.helpers import (
    TINY,
    free_port,
    layout_facts,
    local_rank_env,
    make_trainer,
    run_layout,
    slice_only_safe_open,
    spawn,
)

HF_TINY = [*TINY, "moe.bias_update_rate=0", "train.steps=2", "checkpoint.enabled=true"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    """Two trained steps (so weights are not just the init), exported through the CLI."""
    run = tmp_path_factory.mktemp("run")
    trainer = make_trainer(compose([*HF_TINY, f"run.dir={run}"]))
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
    imported = make_trainer(compose([*HF_TINY, f"run.dir={tmp_path}", f"train.init_from={out}"]))
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


def test_configs_no_family_represents_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """GQA attention with sigmoid routing: Mixtral by structure, whose router is softmax."""
    run = tmp_path / "sigmoid"
    trainer = make_trainer(compose([*HF_TINY, "moe=deepseek", "train.steps=1", f"run.dir={run}"]))
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


def _first_loss_from(hf_dir: Path, run_dir: Path) -> float:
    """The first-step loss of one process training from `hf_dir` (the reference for the layouts)."""
    overrides = [*HF_TINY, "train.steps=1", "checkpoint.enabled=false", f"train.init_from={hf_dir}"]
    return make_trainer(compose([*overrides, f"run.dir={run_dir}"])).fit()[0]["loss"]


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_init_from_hf_dir_under_tp2_pp2(exported, tmp_path: Path) -> None:
    """Four ranks (two pipeline stages, each tensor-parallel over two ranks) cut their TP shards of their
    stage's blocks from the safetensors: the gathered weights are the exported ones bit for bit, and the first
    step's loss is the one-process init_from run's (fp32, 1e-5 rel)."""
    trainer, out = exported
    expected = _first_loss_from(out, tmp_path / "single")
    overrides = [
        *HF_TINY,
        "train.steps=1",
        "checkpoint.enabled=false",
        "parallel.tp=2",
        "parallel.pp=2",
        f"train.init_from={out}",
        f"run.dir={tmp_path / 'tp2pp2'}",
    ]
    result = run_layout(overrides, 4, str(tmp_path / "result.pt"), free_port())
    assert [f["blocks"] for f in result["layout"]] == [[0], [0], [1], [1]]
    for facts in result["layout"]:
        assert any(p[0] == "dtensor" and p[2] == ("tp",) for p in facts["params"].values()), facts["params"]
    weights = full_state_dict(trainer.pm)
    assert result["initial"].keys() == weights.keys()
    for name, value in weights.items():
        assert torch.equal(result["initial"][name], value), name
    assert result["history"][0]["loss"] == pytest.approx(expected, rel=1e-5)


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    weight_map = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(str(hf_dir / file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (not a dict)
    assert tensors.keys() == weight_map.keys()
    return tensors


@pytest.fixture(scope="module")
def exported_bf16(exported) -> Path:
    """The same run exported with `--dtype bfloat16`."""
    _, out = exported
    run, bf16 = out.with_name(out.name.removesuffix("-hf")), out.with_name(out.name.replace("-hf", "-bf16"))
    assert main(["export", str(run), "--out", str(bf16), "--dtype", "bfloat16"]) == 0
    return bf16


def test_export_bfloat16_is_the_fp32_export_rounded(exported, exported_bf16: Path) -> None:
    """`--dtype bfloat16`: every tensor is stored as BF16 and equals the fp32 export cast to bf16 (round to
    nearest even) bit for bit; config.json and the index say so (total_size counts 2 bytes per element)."""
    _, out = exported
    bf16 = exported_bf16
    config = json.loads((bf16 / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    fp32, half = _tensors(out), _tensors(bf16)
    assert half.keys() == fp32.keys()
    for name, value in fp32.items():
        assert value.dtype == torch.float32 and half[name].dtype == torch.bfloat16, name
        assert torch.equal(half[name], value.to(torch.bfloat16)), name
    total = json.loads((bf16 / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total == 2 * sum(t.numel() for t in fp32.values())


def test_bfloat16_export_runs_in_transformers_close_to_fp32(exported, exported_bf16: Path, tmp_path: Path) -> None:
    """transformers loads the bf16 export as bf16 (config.json's dtype) with nothing missing. Its logits are
    those of our fp32 model up to bf16 error: weights and activations rounded to 8 significant bits (unit
    roundoff 2^-9 ~ 2e-3 relative) through two blocks, plus the odd top-k choice that flips on a near-tie.
    Bounds: max |diff| <= 0.03 and mean |diff| <= 2e-3 on logits of max |logit| ~0.7 (measured 4e-3 to 8e-3,
    and 6e-4). No argmax check: two trained steps leave the logits nearly flat, so a bf16 ulp can swap the
    top token. Read back as fp32, the bf16 file gives transformers and our `train.init_from` the same model
    (logits equal to 1e-5; measured 1.5e-7)."""
    from transformers import MixtralForCausalLM

    trainer, _ = exported
    bf16 = exported_bf16
    model, info = MixtralForCausalLM.from_pretrained(bf16, dtype="auto", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert next(model.parameters()).dtype == torch.bfloat16
    tokens, _ = trainer.data.batch(123, 4)
    with torch.no_grad():
        ours = trainer.pm.parts[0](tokens)
        theirs = model.eval()(input_ids=tokens).logits.float()
    diff = (theirs - ours).abs()
    assert diff.max() <= 0.03 and diff.mean() <= 2e-3, (diff.max().item(), diff.mean().item())

    rounded = make_trainer(compose([*HF_TINY, f"run.dir={tmp_path / 'rounded'}", f"train.init_from={bf16}"]))
    upcast = MixtralForCausalLM.from_pretrained(bf16, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(upcast(input_ids=tokens).logits, rounded.pm.parts[0](tokens), rtol=1e-5, atol=1e-5)


# --- every family under tp2*ep2 and pp2 ---------------------------------------------------------------------

FAMILY_RUN = [
    "train.log_every=1",
    "data.max_files=20",
    "train.seq_len=32",
    "profiling=off",
    "train.eval_every=0",
    "train.steps=2",
    "checkpoint.enabled=false",
]


@pytest.fixture(scope="module")
def family_imports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], dict]]:
    """Per family: the overrides `moeyard import` derives for a tiny random transformers model, and what one
    process training from it gives: the weights it read and the losses of two steps."""
    from tests.unit.test_gpt_oss import save_tiny as save_gpt_oss  # (transformers: here, not in every rank)
    from tests.unit.test_hf_families import TINY as FAMILIES
    from tests.unit.test_hf_families import import_overrides, save_tiny

    root = tmp_path_factory.mktemp("families")
    imports = {}
    savers = {f: lambda out, f=f: save_tiny(f, out) for f in FAMILIES if f != "mixtral"}  # Mixtral: above
    savers["gpt_oss"] = save_gpt_oss  # sinks sharded with the heads under tp, expert biases with the experts
    for family, save in savers.items():
        save(root / family)
        overrides = [*import_overrides(root / family), *FAMILY_RUN]
        trainer = make_trainer(compose([*overrides, f"run.dir={root / f'run_{family}'}"]))
        initial = full_state_dict(trainer.pm)
        losses = [h["loss"] for h in trainer.fit()]
        imports[family] = (overrides, {"initial": initial, "losses": losses, "state": full_state_dict(trainer.pm)})
    return imports


def _families_rank(rank: int, world: int, port: int, runs: dict[str, list[str]], out: str) -> None:
    """One rank of a group that trains every family in turn; rank 0 saves what each gave."""
    local_rank_env(rank, world, port)
    results = {}
    for family, overrides in runs.items():
        reads: list[int] = []
        real = train_hf.safe_open
        train_hf.safe_open = slice_only_safe_open(real, lambda name, t, reads=reads: reads.append(t.numel()))
        try:
            trainer = make_trainer(compose(overrides))
        finally:
            train_hf.safe_open = real
        pm = trainer.pm
        kept = sum(shard_extent(n, t, pm.dims, pm.expert_mesh)[2].numel() for n, t in ckpt.model_tensors(pm))
        counts = [None] * world
        dist.all_gather_object(counts, (sum(reads), kept))
        initial = full_state_dict(pm)
        losses = [h["loss"] for h in trainer.fit()]
        state, facts = full_state_dict(pm), layout_facts(trainer)
        results[family] = {"initial": initial, "losses": losses, "state": state, "facts": facts, "counts": counts}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


FAMILY_LAYOUTS = [
    ("tp2_ep2_fsdp", 4, ["parallel.tp=2", "parallel.ep=2", "parallel.dp_mode=fsdp"]),
    ("pp2", 2, ["parallel.pp=2"]),
]


@pytest.mark.multiproc
@pytest.mark.timeout(400)
@pytest.mark.parametrize(("name", "world", "layout"), FAMILY_LAYOUTS, ids=[x[0] for x in FAMILY_LAYOUTS])
def test_every_family_imports_under_the_layout(family_imports, tmp_path: Path, name: str, world: int, layout) -> None:
    """Each rank reads only the slices of every family's weights that it keeps (counted through safe_open):
    gathered, they are one process's bit for bit; the two steps' losses and the trained weights are one
    process's (fp32), which checks the gradients too, e.g. the sum over tp of Qwen2-MoE's shared-expert gate."""
    runs = {f: [*overrides, *layout, f"run.dir={tmp_path / f}"] for f, (overrides, _) in family_imports.items()}
    out = str(tmp_path / "result.pt")
    spawn(_families_rank, (world, free_port(), runs, out), world)
    results = torch.load(out, weights_only=True)
    for family, (_, want) in family_imports.items():
        got = results[family]
        if name == "pp2":
            assert got["facts"]["blocks"] == [0], family
        else:
            params = got["facts"]["params"]
            assert any(p[0] == "dtensor" and "tp" in p[2] for p in params.values()), family
            assert params["layers.1.moe.experts.w1"][3][0] < 8, family  # experts split over ep (and FSDP)
            if family == "gpt_oss":  # its sinks split with the 4 heads over tp (and FSDP), expert biases over ep
                _, _, mesh, local = params["layers.0.attention.sinks.weight"]
                assert "tp" in mesh and local[0] <= 2, (mesh, local)
                assert params["layers.1.moe.experts.b1"][3][0] < 8, params["layers.1.moe.experts.b1"]
        assert got["initial"].keys() == want["initial"].keys(), family
        for key, value in want["initial"].items():
            assert torch.equal(got["initial"][key], value), (family, key)
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5), family
        for key, value in want["state"].items():  # fp32 rounding only (as the golden suite's EXACT layouts)
            torch.testing.assert_close(got["state"][key], value, rtol=1e-4, atol=1e-5, msg=f"{family} {key}")
        full = sum(t.numel() for t in want["initial"].values())
        for read, kept in got["counts"]:
            # Only its shards' slices, up to the rest of a head whose rows FSDP cuts (Qwen2-MoE's k rows under
            # tp2 x dp2: 3% more than kept, measured).
            assert kept < full and read <= 1.05 * kept, (family, read, kept, full)
