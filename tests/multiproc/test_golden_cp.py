"""The golden contract for context parallelism (parallel/context.py): every cp layout trains exactly like one
process, on packed documents (data.document_mask) with grouped-query attention (the debug model's 4 query
heads over 2 kv heads), and each rank holds the load-balanced positions of every row.

Layouts: on 4 ranks, in one spawned group, cp2 (x dp2, with FSDP over the dp x cp ranks), cp2 x tp2, cp2 x
ep2 (the expert-parallel pair is the cp pair) and cp2 x pp2 with multi-head latent attention; on 8 ranks,
in one group, tp2 x cp2 x ep2 (dp2; the expert-parallel pair is the tp pair, replicated over cp and dp) and
tp2 x cp2 x ep4 (dp2), whose expert-parallel groups span tp and cp ranks. The one-process reference is the
same config with cp=1.

Reuses tests/multiproc/test_golden.py: BASE, `reference`, `tolerance`, `assert_same_training` and
`assert_layout_applied` (placements, shards, stages, dispatchers); here each rank also reports which
positions of a row it holds, against `local_positions` of its cp rank.

    .venv/bin/pytest -q tests/multiproc/test_golden_cp.py   # ~2 min on 2 idle cores
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose
from moeyard.parallel.context import local_positions
from moeyard.parallel.dims import ParallelDims
from moeyard.parallel.state import full_state_dict
from tests.helpers import free_port, layout_facts, local_rank_env, make_trainer, spawn
from tests.multiproc import test_golden as golden
from tests.multiproc.test_golden_attention import MLA

SHORT_DOCS, STDLIB_DOCS, SHORT_DOCS_MLA = "short documents", "stdlib documents", "short documents, MLA"
"""The data of a case: many short documents (every row and cp chunk crosses separators), or the golden suite's
standard-library files with their separators masked (few rows cross one). Tensor parallelism alone, without
cp, already ends one expert weight element 1.24e-5 from one process's on the short documents, beyond EXACT's
1e-5 (Adam turns a near-zero gradient's rounding into a larger step), so the cases with tp train on the
golden suite's data, on which test_golden.py holds tp to EXACT. MLA (test_golden_attention.py's widths) gathers
its latents and rotary keys instead of keys and values."""
FOUR_RANKS = [
    ("cp2-dp2-fsdp", ["parallel.cp=2", "parallel.dp=2", "parallel.dp_mode=fsdp"], SHORT_DOCS),
    ("cp2-tp2", ["parallel.cp=2", "parallel.tp=2"], STDLIB_DOCS),
    ("cp2-ep2-dp2", ["parallel.cp=2", "parallel.ep=2", "parallel.dp=2"], SHORT_DOCS),
    ("cp2-pp2-mla", ["parallel.cp=2", "parallel.pp=2"], SHORT_DOCS_MLA),
]
EIGHT_RANKS = [
    ("tp2-cp2-ep2-dp2", ["parallel.tp=2", "parallel.cp=2", "parallel.ep=2", "parallel.dp=2"], STDLIB_DOCS),
    ("tp2-cp2-ep4-dp2", ["parallel.tp=2", "parallel.cp=2", "parallel.ep=4", "parallel.dp=2"], STDLIB_DOCS),
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """The data configs of the cases by name: prepared byte tokens of many short documents, and the default
    data with document masking."""
    root = tmp_path_factory.mktemp("docs")
    texts = root / "texts"
    texts.mkdir()
    for i in range(80):
        (texts / f"{i:03d}.txt").write_text(f"doc {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3))
    prepare([texts], root / "tokens")
    short = ["data=tokens", f"data.path={root / 'tokens'}", "data.document_mask=true"]
    return {SHORT_DOCS: short, STDLIB_DOCS: ["data.document_mask=true"], SHORT_DOCS_MLA: [*short, *MLA]}


def _rank_layouts(rank: int, world: int, port: int, runs: list[tuple[list[str], str]]) -> None:
    """Trains each (overrides, out) in turn in one process group (`helpers._rank` for several layouts)."""
    local_rank_env(rank, world, port)
    for overrides, out in runs:
        trainer = make_trainer(compose(overrides))
        initial = full_state_dict(trainer.pm)
        history = trainer.fit()
        facts = layout_facts(trainer)
        context = trainer.pm.parts[0].context
        facts["positions"] = context.positions_S.tolist() if context is not None else None
        gathered = [None] * world
        dist.all_gather_object(gathered, facts)
        state = full_state_dict(trainer.pm)
        if rank == 0:
            torch.save({"history": history, "state": state, "initial": initial, "layout": gathered}, out)
        dist.barrier()
    dist.destroy_process_group()


def assert_positions(overrides: list[str], world: int, got: dict) -> None:
    """Each rank holds chunks r and 2 cp - 1 - r of every row, r its cp rank (the mesh: pp, dp, cp, tp)."""
    cfg = compose(overrides)
    dims = ParallelDims.from_config(cfg.parallel, world)
    for rank, facts in enumerate(got["layout"]):
        cp_rank = rank // dims.tp % dims.cp
        want = local_positions(cfg.train.seq_len, dims.cp, cp_rank).tolist()
        assert facts["positions"] == want, f"rank {rank} holds positions {facts['positions']}, not {want}"


def _check_all(cases: list[tuple], world: int, data: dict[str, list[str]], tmp_path, tmp_path_factory) -> None:
    """Trains `cases` in one spawned group of `world` ranks; each against its one-process reference."""
    refs = {name: golden.reference(data[source], tmp_path_factory) for name, _, source in cases}
    runs = [
        ([*golden.BASE, *data[source], *layout, f"run.dir={tmp_path / name}"], str(tmp_path / f"{name}.pt"))
        for name, layout, source in cases
    ]
    spawn(_rank_layouts, (world, free_port(), runs), world)
    for (name, _, _), (overrides, out) in zip(cases, runs, strict=True):
        got = torch.load(out, weights_only=True)
        assert len(got["history"]) == 5, name
        golden.assert_layout_applied(overrides, world, got)
        assert_positions(overrides, world, got)
        golden.assert_same_training(refs[name], got)


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_cp_layouts_on_four_ranks_train_like_one_process(data, tmp_path, tmp_path_factory):
    _check_all(FOUR_RANKS, 4, data, tmp_path, tmp_path_factory)


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_cp_with_tp_and_ep_on_eight_ranks_trains_like_one_process(data, tmp_path, tmp_path_factory):
    _check_all(EIGHT_RANKS, 8, data, tmp_path, tmp_path_factory)
