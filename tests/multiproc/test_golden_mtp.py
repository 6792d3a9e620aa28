"""The golden contract for multi-token prediction (model.mtp_layers, moe/mtp.py): with two MTP modules, every
layout trains like one process (LM loss, MTP loss, balancing terms, every parameter), with the MTP modules'
blocks sharded like blocks and held, with a copy of the embedding, by the last pipeline stage.

Layouts, on 2 ranks in one spawned group: pp2 (1F1B) on packed documents (data.document_mask), pp2
interleaved (2 stages a rank), tp2, and ep2 (dp2) with FSDP and full activation checkpointing, against the
one-process reference of the same variant (3 steps each). Reuses tests/multiproc/test_golden.py: BASE,
`reference`, `assert_same_training`, `assert_layout_applied` (its expected layout extended here by what
MTP adds: the last stage's MTP blocks, MTP modules and embedding copy).

    .venv/bin/pytest -q tests/multiproc/test_golden_mtp.py   # ~1 min on 2 idle cores
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose
from moeyard.parallel.state import full_state_dict
from tests.helpers import free_port, layout_facts, local_rank_env, make_trainer, spawn
from tests.multiproc import test_golden as golden

STEPS = ["train.steps=3"]
MTP = ["model.mtp_layers=2", "train.mtp_loss_coef=0.3"]
DOCS = "documents"
"""Stands for MTP on the `documents` fixture's data."""
LAYOUTS = [
    # Some cases cover several asks: pp2 on packed documents; ep2 with FSDP and full activation checkpointing.
    ("pp2-documents", DOCS, ["parallel.pp=2"]),
    (
        "pp2-interleaved",
        MTP,
        ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"],
    ),  # noqa: E501
    ("tp2", MTP, ["parallel.tp=2"]),
    (
        "ep2-dp2-fsdp-full-ac",
        MTP,
        ["parallel.dp=2", "parallel.ep=2", "parallel.dp_mode=fsdp", "parallel.activation_checkpoint=full"],
    ),  # noqa: E501
]


_expected_layout = golden.expected_layout


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """MTP on prepared byte tokens of many short documents (as tests/multiproc/test_golden_cp.py's): every
    32-token row crosses separators, so every depth leaves out positions that read across one."""
    root = tmp_path_factory.mktemp("docs")
    texts = root / "texts"
    texts.mkdir()
    for i in range(80):
        (texts / f"{i:03d}.txt").write_text(f"doc {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3))
    prepare([texts], root / "tokens")
    return [*MTP, "data=tokens", f"data.path={root / 'tokens'}", "data.document_mask=true"]


def expected_mtp_layout(overrides: list[str], world: int, rank: int) -> dict:
    """`golden.expected_layout`, plus what MTP adds on the rank holding the last stage: the MTP blocks (like
    any block: sharded, checkpointed, dispatched alike) and, under pp, the embedding's copy."""
    want = _expected_layout(overrides, world, rank)
    cfg = compose(overrides)
    p, n = cfg.parallel, cfg.model.n_layers
    if (p.pp * p.pp_stages_per_rank) - 1 not in want["stages"]:
        return want
    dims = golden.ParallelDims.from_config(p, world)
    ids = list(range(n, n + cfg.model.mtp_layers))
    fsdp = p.dp_mode == "fsdp" and dims.dp > 1
    with torch.device("meta"):
        from moeyard.moe.model import Transformer

        full = Transformer(cfg.model, cfg.moe)
    for name, t in full.named_parameters():
        if name == "tok_embeddings.weight" or any(name.startswith(f"layers.{b}.") for b in ids):
            want["params"][name] = golden._expected_param(name, list(t.shape), dims, p.sequence_parallel, fsdp)
    want["blocks"] = sorted(want["blocks"] + ids)
    if p.activation_checkpoint == "full":
        want["ac"] = sorted(want["ac"] + ids)
    moe_ids = [b for b in ids if cfg.model.is_moe_layer(b)]
    if fsdp:  # each MTP block is a unit, its experts one more
        units = [f"layers.{b}" for b in ids] + [f"layers.{b}.moe.experts" for b in moe_ids]
        want["fsdp"] = sorted(want["fsdp"] + units)
    some = next(iter(want["dispatch"].values()))
    want["dispatch"].update({b: some for b in moe_ids})
    want["numel"] = sum(torch.Size(v[3]).numel() for v in want["params"].values())
    return want


def _rank_layouts(rank: int, world: int, port: int, runs: list[tuple[list[str], str]]) -> None:
    """Trains each (overrides, out) in turn in one process group (`helpers._rank` for several layouts)."""
    local_rank_env(rank, world, port)
    for overrides, out in runs:
        trainer = make_trainer(compose(overrides))
        initial = full_state_dict(trainer.pm)
        history = trainer.fit()
        gathered = [None] * world
        dist.all_gather_object(gathered, layout_facts(trainer))
        state = full_state_dict(trainer.pm)
        if rank == 0:
            torch.save({"history": history, "state": state, "initial": initial, "layout": gathered}, out)
        dist.barrier()
    dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_mtp_layouts_train_like_one_process(documents, tmp_path, tmp_path_factory, monkeypatch):
    cases = [(name, documents if variant == DOCS else variant, layout) for name, variant, layout in LAYOUTS]
    runs = [
        ([*golden.BASE, *STEPS, *variant, *layout, f"run.dir={tmp_path / name}"], str(tmp_path / f"{name}.pt"))
        for name, variant, layout in cases
    ]
    spawn(_rank_layouts, (2, free_port(), runs), 2)
    monkeypatch.setattr(golden, "expected_layout", expected_mtp_layout)
    for (name, variant, _), (overrides, out) in zip(cases, runs, strict=True):
        ref = golden.reference([*STEPS, *variant], tmp_path_factory)
        got = torch.load(out, weights_only=True)
        assert len(got["history"]) == 3, name
        golden.assert_layout_applied(overrides, 2, got)
        golden.assert_same_training(ref, got)
        mtp_got = torch.tensor([h["mtp_loss"] for h in got["history"]], dtype=torch.float64)
        mtp_ref = torch.tensor([h["mtp_loss"] for h in ref["history"]], dtype=torch.float64)
        # The MTP loss: an LM loss over the same logits' sums, so the LM loss's fp32 tolerance.
        torch.testing.assert_close(mtp_got, mtp_ref, rtol=golden.EXACT.loss_rtol, atol=0.0, msg=name)
