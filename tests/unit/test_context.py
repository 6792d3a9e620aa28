"""Context parallelism's pieces in one process (parallel/context.py, moe/masking.py, job/layout.py): the
load-balanced split of a row and its inverse, the mask rows a cp rank attends with (dense and FlexAttention's),
and the layout rules. The training itself is the golden suite's (tests/multiproc/test_golden_cp.py).

    .venv/bin/pytest -q tests/unit/test_context.py
"""

from __future__ import annotations

import pytest
import torch

from moeyard.job.compose import compose
from moeyard.job.layout import check_layout
from moeyard.moe.masking import block_causal_mask, context_mask, flex_block_mask
from moeyard.parallel.context import local_positions, merge_sequence, split_sequence
from moeyard.parallel.dims import ParallelDims


def test_each_rank_holds_one_chunk_from_either_end():
    """seq 16 over cp 2: 4 chunks of 4; rank 0 holds the first and the last, rank 1 the middle two."""
    assert local_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_causal_work_is_balanced(cp):
    """Every rank attends over the same number of (query, key) pairs under a causal mask: sum(pos + 1)."""
    work = [int((local_positions(32, cp, r) + 1).sum()) for r in range(cp)]
    assert len(set(work)) == 1 and sum(work) == 32 * 33 // 2


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_then_merge_gives_the_rows_back(cp):
    x_BSD = torch.arange(2 * 16 * 3).view(2, 16, 3)
    parts = [split_sequence(x_BSD, cp, r) for r in range(cp)]
    assert all(p.shape == (2, 16 // cp, 3) for p in parts)
    assert torch.equal(merge_sequence(parts), x_BSD)
    positions = torch.cat([local_positions(16, cp, r) for r in range(cp)])
    assert sorted(positions.tolist()) == list(range(16))  # every position held exactly once


def _doc_ids() -> torch.Tensor:
    """Two rows of 16 tokens with documents of different lengths (a boundary inside every cp chunk of 4)."""
    return torch.tensor([[0] * 3 + [1] * 6 + [2] * 7, [0] * 9 + [1] * 2 + [2] * 5])


@pytest.mark.parametrize("documents", [False, True])
def test_context_mask_is_the_rows_of_the_whole_mask(documents):
    doc = _doc_ids() if documents else None
    whole = block_causal_mask(doc) if documents else torch.ones(16, 16, dtype=torch.bool).tril()[None, None]
    for rank in range(2):
        pos = local_positions(16, 2, rank)
        got = context_mask(doc, pos, 16)
        assert got.shape == (2 if documents else 1, 1, 8, 16)
        assert torch.equal(got, whole[:, :, pos])


@pytest.mark.parametrize("documents", [False, True])
def test_flex_block_mask_with_positions_matches_the_dense_rows(documents):
    """FlexAttention's BlockMask for a rank's queries allows exactly what the dense rows allow (evaluated by
    its mask function, element by element)."""
    doc = _doc_ids() if documents else None
    pos = local_positions(16, 2, 1)
    block = flex_block_mask(doc, 16, torch.device("cpu"), pos)
    dense = context_mask(doc, pos, 16)
    b, q, k = torch.meshgrid(torch.arange(dense.shape[0]), torch.arange(8), torch.arange(16), indexing="ij")
    allowed = block.mask_mod(b, torch.zeros_like(b), q, k)
    assert torch.equal(allowed, dense[:, 0])
    assert block.shape[-2:] == (8, 16)


BASE = ["model=debug", "train.seq_len=32", "train.batch_size=8", "train.micro_batches=2"]


def _check(*overrides: str, world: int = 2) -> None:
    cfg = compose([*BASE, *overrides])
    check_layout(cfg, ParallelDims.from_config(cfg.parallel, world))


def test_cp_ranks_fold_into_the_world_and_the_experts():
    cfg = compose([*BASE, "parallel.cp=2", "parallel.ep=4", "parallel.tp=2"])
    dims = ParallelDims.from_config(cfg.parallel, 8)
    assert (dims.dp, dims.cp, dims.dp_cp, dims.edp) == (2, 2, 4, 2)
    with pytest.raises(ValueError, match=r"parallel.pp\*cp\*tp=4 must divide the world size 6"):
        ParallelDims.from_config(compose([*BASE, "parallel.cp=2", "parallel.tp=2"]).parallel, 6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.seq_len=30"], r"train.seq_len=30 must be divisible by 2 x parallel.cp=2"),
        (["parallel.tp=4", "train.seq_len=36"], r"train.seq_len=36 must be divisible by parallel.cp=2 x parallel.tp=4"),
        (["model.sliding_window=8"], r"model.sliding_window=8 is not supported with parallel.cp=2"),
        (["moe.capacity_factor=1.0"], r"moe.capacity_factor=1.0 must be null \(dropless\) with parallel.cp=2"),
        (["moe=expert_choice"], r"moe.router=expert_choice is not supported with parallel.cp=2"),
        (["moe.dispatch=static"], r"moe.dispatch=static is not supported with parallel.cp=2"),
        (["parallel.compile=true"], r"parallel.compile=True is not supported with parallel.cp=2"),
    ],
)  # fmt: skip
def test_unsupported_cp_combinations_are_refused_in_one_line(overrides, message):
    world = 8 if "parallel.tp=4" in overrides else 2
    with pytest.raises(ValueError, match=message):
        _check("parallel.cp=2", *overrides, world=world)


# --- the planner ---------------------------------------------------------------------------------------------


def test_planner_memory_keeps_local_queries_and_the_whole_rows_keys():
    """Per block, a cp rank saves 1/cp of every per-token activation, but attention's keys and values whole:
    cp2 saves exactly half of one process's block less half of the gathered k and v it keeps twice."""
    from moeyard.plan.activations import Shape, block_bytes

    cfg = compose(BASE)
    m, e = cfg.model, cfg.moe
    one = block_bytes(m, e, Shape(rows=2, seq=32), True)
    cp2 = block_bytes(m, e, Shape(rows=2, seq=16, cp=2), True)
    kv_whole = 2 * 32 * 2 * m.n_kv_heads * m.head_dim * 4  # rows x S x (k and v) x G x Hd x fp32
    for part in one:
        want = one[part] // 2 + (kv_whole // 2 if part == "attn" else 0)
        assert abs(cp2[part] - want) <= 8, (part, cp2[part], want)


def test_planner_times_the_key_value_all_gather():
    """For long rows `moeyard plan` enumerates cp; a cp2 layout's step carries the per-layer all-gathers (in
    the tp column), dp2's, with as many tokens per rank, none."""
    from moeyard.plan.layouts import plan
    from moeyard.plan.planner import Layout

    cfg = compose([*BASE, "train.seq_len=16384", "model.max_seq_len=16384", "cluster.gpu=h100", "cluster.nodes=1",
                   "cluster.gpus_per_node=2"])  # fmt: skip
    result = plan(cfg)
    by_layout = {p.layout: p for p in result.predictions}
    cp2, dp2 = Layout.single(cp=2, micro_batches=2), Layout.single(dp=2, micro_batches=2)
    assert cp2 in by_layout and dp2 in by_layout, "long rows: cp is enumerated"
    assert by_layout[cp2].time.tp > 0 == by_layout[dp2].time.tp
    assert "parallel.cp=2" in cp2.overrides() and cp2.world == 2 and cp2.name() == "cp2"
