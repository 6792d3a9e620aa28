"""The golden contract: every supported layout trains exactly like one process, with its sharding in place.

Each case trains the debug model for 5 steps on gloo ranks (CPU) and compares, against the single-process run
of the same config, the initial parameters (bitwise), the per-step LM loss, aux loss and dropped fraction, and
every gathered parameter and aux-free bias at the end, within a tolerance well below the parameters' movement
over the run. The reference runs once per config variant. Each case also checks, rank by rank, that its
layout was really applied (`assert_layout_applied`): every parameter's DTensor placements, mesh axes and local
shape, the local parameter count, the pipeline blocks held, and where activation checkpointing, compile and
FSDP sit. `test_disabled_transform_is_caught` switches one `apply_*` step off (compile, AC, TP) and shows the
layout check fails; without compile or AC the run still trains exactly like one process.

    .venv/bin/pytest -q tests/multiproc/test_golden.py            # all layouts (~7 min on 2 idle cores)
    .venv/bin/pytest -q tests/multiproc/test_golden.py -k "ep2"   # a subset
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch

import moeyard.parallel.parallelize as parallel_parallelize
from moeyard.job.compose import compose
from moeyard.parallel.dims import ParallelDims
from tests import helpers
from tests.helpers import free_port, run_layout, spawn

BASE = [
    "model=debug",
    "train.steps=5",
    "train.batch_size=8",
    "train.seq_len=32",
    "train.micro_batches=2",
    "train.eval_every=0",
    "profiling.progress=false",
    "optim.warmup_steps=2",
]
# A dense-FFN first block (tensor-parallel like attention) and a shared expert in every MoE block.
MIXED = ["model.first_dense_layers=1", "moe.num_shared_experts=1"]
TIED = ["model.tie_embeddings=true"]
# The default `probability` policy ranks the router weights of different tokens against each other, a
# discontinuous function of them: 2 of the 89 capacity edges of this model's first forward lie within 1e-5
# (relative) of a tie (repeated bytes give near-identical hidden states), and the rounding drift of any
# sharded sum reaches that within a few steps. One flipped decision moves a token's output and gradient
# between experts; later layers then route it differently. No deterministic tie-break removes this (rounding
# the weights to a grid only moves the edges to the grid's), so probability layouts are held to NEAR_TIE.
# `position` decides from top-k choices and positions alone, so its layout is held to EXACT.
DROPPING = ["moe.capacity_factor=1.0"]
DROPPING_BY_POSITION = [*DROPPING, "moe.drop_policy=position"]
AUX_FREE = ["moe=deepseek", "moe.bias_update_rate=0.01", "moe.seq_aux_loss_coef=0.01"]
EXPERT_CHOICE = ["moe=expert_choice"]
NEAR_TIE_VARIANTS = (DROPPING, EXPERT_CHOICE)
"""Variants whose routing ranks different tokens' probabilities (see DROPPING): held to NEAR_TIE."""

# (id, world size, layout overrides, config variant shared with the reference run)
LAYOUTS = [
    ("dp2-compile-tied", 2, ["parallel.compile=true"], TIED),
    ("dp2-fsdp-tied", 2, ["parallel.dp_mode=fsdp"], TIED),
    ("tp2-dense-shared", 2, ["parallel.tp=2"], MIXED),
    ("tp2-sp-dense-shared", 2, ["parallel.tp=2", "parallel.sequence_parallel=true"], MIXED),
    ("ep2-shared", 2, ["parallel.ep=2"], MIXED),
    ("ep2-capacity", 2, ["parallel.ep=2"], DROPPING),
    ("ep2-aux-free", 2, ["parallel.ep=2"], AUX_FREE),
    ("ep2-expert-choice", 2, ["parallel.ep=2"], EXPERT_CHOICE),
    ("pp2-1f1b-3+1-shared", 2, ["parallel.pp=2", "parallel.pp_layers=[3,1]"], MIXED),
    ("pp2-gpipe", 2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"], []),
    (
        "pp2-interleaved",
        2,
        ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"],
        [],
    ),
    # Folding: the expert-parallel group is the tp pair (dp1), or spans tp and dp (ep4 over dp2 x tp2).
    ("tp2-ep2-folded", 2, ["parallel.tp=2", "parallel.ep=2"], []),
    ("tp2-ep4-fsdp-folded", 4, ["parallel.tp=2", "parallel.ep=4", "parallel.dp_mode=fsdp"], []),
    ("tp2-expert-choice", 2, ["parallel.tp=2"], EXPERT_CHOICE),
    ("tp2-ep2", 4, ["parallel.tp=2", "parallel.ep=2"], []),
    ("tp2-ep2-capacity", 4, ["parallel.tp=2", "parallel.ep=2"], DROPPING),
    ("pp2-ep2", 4, ["parallel.pp=2", "parallel.ep=2"], []),
    ("pp2-ep2-capacity-position", 4, ["parallel.pp=2", "parallel.ep=2"], DROPPING_BY_POSITION),
    ("dp2-ep2-fsdp", 4, ["parallel.ep=2", "parallel.dp_mode=fsdp"], []),
    ("ep2-ac-selective", 2, ["parallel.ep=2", "parallel.activation_checkpoint=selective"], []),
    ("ep2-overlap-shared", 2, ["parallel.ep=2", "parallel.ep_overlap=shared"], MIXED),
    (
        "ep2-overlap-chunked3-capacity-position",
        2,
        ["parallel.ep=2", "parallel.ep_overlap=chunked", "parallel.ep_chunks=3"],
        DROPPING_BY_POSITION,
    ),
    (
        "tp2-ac-full-fsdp",
        4,
        ["parallel.tp=2", "parallel.activation_checkpoint=full", "parallel.dp_mode=fsdp"],
        [],
    ),
    ("tp2-pp2-ep2", 8, ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2"], []),
]


@dataclass(frozen=True)
class Tolerance:
    loss_rtol: float
    """Per-step LM loss, relative. Over these 5 steps it falls by >= 1% a step."""
    aux_rtol: float
    """Per-step sum of the balancing and z losses, relative (it changes by >= 1% a step)."""
    dropped_atol: float
    """Per-step dropped fraction of the 2048 token-expert pairs a step routes (2e-3 is four pairs)."""
    param_atol: float | None
    """Elementwise, against the reference (with rtol 1e-4); every tensor must move by >= 100x this."""
    param_rel: float | None = None
    """Per tensor instead: |got - ref| <= param_rel * |ref_final - ref_initial| (Frobenius norms)."""


EXACT = Tolerance(loss_rtol=1e-5, aux_rtol=1e-5, dropped_atol=1e-12, param_atol=1e-5)
"""fp32 rounding only: 1e-5 absolute is 0.3% of one Adam step (lr 3e-3)."""
NEAR_TIE = Tolerance(loss_rtol=1e-4, aux_rtol=2e-3, dropped_atol=2e-3, param_atol=None, param_rel=0.1)
"""Worst measured over three runs: loss 1.6e-5 and aux 4.8e-4 relative (tp2-ep2 probability: a rerouted
token changes its own z-loss by O(1), 1/256 of the mean); one pair (4.9e-4) dropped differently (ep2
probability); parameters 0.024 (ep2 expert-choice) and 0.034 (tp2-ep2 probability) of their movement, the
error sitting in a few experts' rows (EXACT layouts: 2e-5). A model that never trained scores 1."""

_references: dict[tuple[str, ...], dict] = {}


def reference(variant: list[str], tmp_path_factory) -> dict:
    key = tuple(variant)
    if key not in _references:
        out = tmp_path_factory.mktemp("ref") / "ref.pt"
        _references[key] = run_layout([*BASE, *variant, f"run.dir={out.parent}"], 1, str(out), free_port())
    return _references[key]


def _metric(result: dict, *names: str) -> torch.Tensor:
    return torch.tensor([sum(h[n] for n in names) for h in result["history"]], dtype=torch.float64)


def assert_same_training(ref: dict, got: dict, tol: Tolerance = EXACT) -> None:
    """Per-step losses and dropped fraction, then every parameter against the reference, whose movement
    over the run must dwarf the tolerance."""
    torch.testing.assert_close(_metric(got, "loss"), _metric(ref, "loss"), rtol=tol.loss_rtol, atol=0)
    aux = ("aux_loss", "seq_aux_loss", "z_loss")
    torch.testing.assert_close(_metric(got, *aux), _metric(ref, *aux), rtol=tol.aux_rtol, atol=1e-7)
    # Capacity drops a token-expert pair when its expert is full, a count fixed by the top-k choices alone.
    dropped_got, dropped_ref = _metric(got, "dropped_frac"), _metric(ref, "dropped_frac")
    torch.testing.assert_close(dropped_got, dropped_ref, rtol=0, atol=tol.dropped_atol)
    assert got["state"].keys() == ref["state"].keys() == got["initial"].keys()
    for name, value in ref["state"].items():
        assert torch.equal(got["initial"][name], ref["initial"][name]), f"{name} starts from other values"
        moved = value - ref["initial"][name]
        if name.endswith("expert_bias"):  # a buffer, moved only by aux-free updates of +-rate
            torch.testing.assert_close(got["state"][name], value, rtol=0, atol=1e-5, msg=name)
        elif tol.param_rel is not None:
            assert moved.norm() > 0, f"{name} never moved"
            rel = float((got["state"][name] - value).norm() / moved.norm())
            assert rel <= tol.param_rel, f"{name}: |got - ref| is {rel:.3g} of its movement (> {tol.param_rel})"
        else:
            assert moved.abs().max() >= 100 * tol.param_atol, f"{name} moved only {moved.abs().max():.3g}"
            torch.testing.assert_close(
                got["state"][name], value, rtol=1e-4, atol=tol.param_atol, msg=lambda m, n=name: f"{n}: {m}"
            )


# --- what a layout must look like on every rank --------------------------------------------------------

_TP_DIM = {  # tensor-parallel plan of parallel/tensor.py: the sharded tensor dim of each weight
    "tok_embeddings.weight": 0,  # vocab-parallel rows
    "output.weight": 0,  # column-parallel over the vocabulary
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
}
_NORMS = ("norm.weight", "attention_norm.weight", "ffn_norm.weight")
_EXPERT = re.compile(r"\.experts\.w[123]$")


def _expected_param(name: str, shape: list[int], dims: ParallelDims, sp: bool, fsdp: bool) -> tuple:
    """(kind, placements, mesh axes, local shape) of parameter `name` of full shape `shape` on any rank.

    Sizes in the debug model divide every degree, so the local shape is the same on every rank."""
    local = list(shape)
    placements: list[str] = []
    axes: list[str] = []
    block_leaf = re.sub(r"^layers\.\d+\.", "", name)
    tp_dim = _TP_DIM.get(block_leaf) if dims.tp > 1 else None
    tp_replicated = dims.tp > 1 and sp and block_leaf in _NORMS  # SequenceParallel keeps norms as DTensors
    if _EXPERT.search(name):
        local[0] //= dims.ep  # EP: this rank's E/ep experts, a plain tensor
        if fsdp:  # experts are sharded over edp, the ranks holding the same experts
            placements, axes = ["S(0)"], ["edp"]
            local[0] //= dims.edp
    elif fsdp:
        placements.append(f"_S(0, {dims.tp})" if tp_dim == 0 else "S(0)")
        axes.append("dp")
        local[0] //= dims.dp
    if tp_dim is not None:
        placements.append(f"S({tp_dim})")
        axes.append("tp")
        local[tp_dim] //= dims.tp
    elif tp_replicated:
        placements.append("R")
        axes.append("tp")
    assert all(n > 0 for n in local), (name, shape, dims)
    return ("dtensor" if placements else "plain", tuple(placements), tuple(axes), tuple(local))


def expected_layout(overrides: list[str], world: int, rank: int) -> dict:
    """The `layout_facts` rank `rank` must report, derived from the config alone (the full model's shapes
    on the meta device and the sharding rules), never from the code that applies them."""
    from moeyard.moe.model import Transformer

    cfg = compose(overrides)
    p = cfg.parallel
    dims = ParallelDims.from_config(p, world)
    n_stages = dims.pp * p.pp_stages_per_rank
    counts = list(p.pp_layers) or [
        cfg.model.n_layers // n_stages + (s < cfg.model.n_layers % n_stages) for s in range(n_stages)
    ]
    starts = [sum(counts[:s]) for s in range(n_stages)]
    pp_rank = rank // (world // dims.pp)  # pp is the outermost mesh axis
    stages = [pp_rank + k * dims.pp for k in range(p.pp_stages_per_rank)]
    blocks = sorted(b for s in stages for b in range(starts[s], starts[s] + counts[s]))
    with torch.device("meta"):
        full = Transformer(cfg.model, cfg.moe)
    fsdp = p.dp_mode == "fsdp" and dims.dp > 1

    def held(name: str) -> bool:
        if name.startswith("layers."):
            return int(name.split(".")[1]) in blocks
        if name.startswith("tok_embeddings."):
            return 0 in stages
        return n_stages - 1 in stages  # final norm, output

    params = {
        name: _expected_param(name, list(t.shape), dims, p.sequence_parallel, fsdp)
        for name, t in full.named_parameters()  # a tied output weight is the embedding: listed once
        if held(name)
    }
    moe_blocks = [b for b in blocks if cfg.model.is_moe_layer(b)]
    ac = {"none": [], "full": blocks, "selective": [b for b in blocks if b % p.ac_every == 0]}
    units = ["<root>", *(f"layers.{b}" for b in blocks), *(f"layers.{b}.moe.experts" for b in moe_blocks)]
    chunks = p.ep_chunks if p.ep_overlap == "chunked" else 1
    dispatch = ("AllToAllDispatcher", p.ep_overlap, chunks) if dims.ep > 1 else ("DataParallelDispatcher", "-", 1)
    return {
        "params": params,
        "dispatch": {b: dispatch for b in moe_blocks},
        "ac": ac[p.activation_checkpoint],
        "fsdp": sorted(units) if fsdp else [],
        "compiled": blocks if p.compile else [],
        "stages": stages,
        "blocks": blocks,
        "numel": sum(torch.Size(v[3]).numel() for v in params.values()),
        "full_numel": sum(t.numel() for t in full.parameters()),
    }


def assert_layout_applied(overrides: list[str], world: int, got: dict) -> None:
    """Every rank's `layout_facts` equal `expected_layout`; one AssertionError lists all differences."""
    problems = []
    assert len(got["layout"]) == world
    for rank, facts in enumerate(got["layout"]):
        want = expected_layout(overrides, world, rank)
        for key in ("stages", "blocks", "ac", "fsdp", "compiled", "dispatch"):
            if facts[key] != want[key]:
                problems.append(f"rank {rank} {key}: {facts[key]} != expected {want[key]}")
        for name in sorted(want["params"].keys() | facts["params"].keys()):
            have, should = facts["params"].get(name), want["params"].get(name)
            if have != should:
                problems.append(f"rank {rank} {name}: {have} != expected {should}")
        if facts["numel"] != want["numel"]:
            problems.append(
                f"rank {rank} numel: {facts['numel']} ({facts['numel'] / want['full_numel']:.3f} of the model)"
                f" != expected {want['numel']} ({want['numel'] / want['full_numel']:.3f})"
            )
    assert not problems, f"{len(problems)} layout differences:\n" + "\n".join(problems[:40])


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("world", "layout", "variant"), [c[1:] for c in LAYOUTS], ids=[c[0] for c in LAYOUTS])
def test_layout_trains_like_one_process(world, layout, variant, tmp_path, tmp_path_factory):
    ref = reference(variant, tmp_path_factory)
    overrides = [*BASE, *variant, *layout, f"run.dir={tmp_path}"]
    got = run_layout(overrides, world, str(tmp_path / "got.pt"), free_port())
    assert len(got["history"]) == 5
    assert_layout_applied(overrides, world, got)
    dropped = _metric(got, "dropped_frac")
    if "moe.capacity_factor=1.0" in variant:
        assert (dropped > 0).all(), f"capacity dropped nothing in some step: {dropped.tolist()}"
    else:
        assert (dropped == 0).all(), dropped.tolist()
    assert_same_training(ref, got, NEAR_TIE if variant in NEAR_TIE_VARIANTS else EXACT)


# --- a layout with one transform switched off ----------------------------------------------------------


def _skip(*args, **kwargs) -> None:
    """Stands in for a disabled `apply_*` step."""


def _rank_without(rank: int, world: int, port: int, overrides: list[str], out: str, disabled: list[str]) -> None:
    """`helpers._rank` with the named `parallel_parallelize` steps replaced by no-ops (in this spawned rank)."""

    for name in disabled:
        setattr(parallel_parallelize, name, _skip)
    helpers._rank(rank, world, port, overrides, out)


DISABLED = [
    # (id, world, layout overrides, variant, disabled step, a line the layout check must report, and whether
    # training is unchanged without the step, so that only the layout check can tell)
    ("dp2-without-apply_compile", 2, ["parallel.compile=true"], TIED, "apply_compile", "compiled: []", True),
    (
        "ep2-ac-selective-without-apply_ac",
        2,
        ["parallel.ep=2", "parallel.activation_checkpoint=selective"],
        [],
        "apply_ac",
        "ac: [] != expected [0, 2]",
        True,
    ),
    # Each tp rank then holds whole weights; the MoE layers still split each sequence over tp (apply_ep),
    # without the TP plan's sequence slicing, so here the losses drift too (~2e-4 relative).
    ("tp2-without-apply_tp", 2, ["parallel.tp=2"], MIXED, "apply_tp", "layers.0.feed_forward.w2.weight", False),
]


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("world", "layout", "variant", "disabled", "reported", "blind"),
    [c[1:] for c in DISABLED],
    ids=[c[0] for c in DISABLED],
)
def test_disabled_transform_is_caught(world, layout, variant, disabled, reported, blind, tmp_path, tmp_path_factory):
    """A layout with one `apply_*` step switched off fails `assert_layout_applied`; without compile or AC it
    still trains exactly like one process, so nothing else would notice."""
    overrides = [*BASE, *variant, *layout, f"run.dir={tmp_path}"]
    out = str(tmp_path / "got.pt")
    spawn(_rank_without, (world, free_port(), overrides, out, [disabled]), world)
    got = torch.load(out, weights_only=True)
    if blind:
        assert_same_training(reference(variant, tmp_path_factory), got)
    with pytest.raises(AssertionError, match=re.escape(reported)):
        assert_layout_applied(overrides, world, got)


def test_capacity_variants_really_drop():
    """Both dropping variants drop tokens in one process's first forward, or their cases prove nothing."""
    from moeyard.moe.model import Transformer, init_weights

    for variant in (DROPPING, DROPPING_BY_POSITION):
        cfg = compose([*BASE, *variant])
        model = Transformer(cfg.model, cfg.moe)
        init_weights(model, cfg.train.seed)
        model(torch.randint(0, 256, (4, 32)))
        stats = [s for moe in model.moe_layers().values() for s in moe.drain_stats()]
        assert sum(int(s["routed"].sum() - s["kept"].sum()) for s in stats) > 0, variant
