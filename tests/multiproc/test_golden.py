"""The golden contract: every supported layout trains exactly like one process, with its sharding in place.

Each case trains the debug model for 5 steps on gloo ranks (CPU) and compares, against the single-process run
of the same config, the initial parameters (bitwise), the per-step LM loss, aux loss and dropped fraction, and
every gathered parameter and aux-free bias at the end, within a tolerance well below the parameters' movement
over the run: fp32 rounding (EXACT), widened only by what the reference's own decisions within rounding of a
tie can turn (`tolerance`, near_ties.py). The reference runs once per config variant. Each case also checks,
rank by rank, that its layout was really applied (`assert_layout_applied`): every parameter's DTensor
placements, mesh axes and local shape, the local parameter count, the pipeline blocks held, and where
activation checkpointing, compile and FSDP sit. `test_disabled_transform_is_caught` switches one `apply_*`
step off (compile, AC, TP) and shows the layout check fails; without compile or AC the run still trains
exactly like one process.

    .venv/bin/pytest -q tests/multiproc/test_golden.py            # all layouts (~7 min on 2 idle cores)
    .venv/bin/pytest -q tests/multiproc/test_golden.py -k "ep2"   # a subset
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, replace

import pytest
import torch

import moeyard.parallel.parallelize as parallel_parallelize
from moeyard.job.compose import compose
from moeyard.parallel.dims import ParallelDims
from moeyard.plan.planner import Layout
from tests import helpers
from tests.helpers import free_port, run_layout, spawn
from tests.multiproc import near_ties

BASE = [
    "model=debug",
    "train.steps=5",
    "train.batch_size=8",
    "train.seq_len=32",
    "train.micro_batches=2",
    "train.eval_every=0",
    "train.log_every=1",  # every step's metrics are compared
    "profiling.progress=false",
    "optim.warmup_steps=2",
]
# A dense-FFN first block (tensor-parallel like attention) and a shared expert in every MoE block.
MIXED = ["model.first_dense_layers=1", "moe.num_shared_experts=1"]
TIED = ["model.tie_embeddings=true"]
# The default `probability` policy ranks the router weights of different tokens against each other, a
# discontinuous function of them, and repeated bytes give near-identical hidden states: some capacity edges lie
# within rounding of a tie, and a layout's differently ordered sums may turn them. One flipped decision moves a
# token's output and gradient between experts; later layers then route it differently. No deterministic
# tie-break removes this (rounding the weights to a grid only moves the edges to the grid's), so each
# reference counts the decisions it made within rounding of a tie (near_ties.py), and `tolerance` derives
# the allowance from that count: EXACT where there are none.
DROPPING = ["moe.capacity_factor=1.0"]
DROPPING_BY_POSITION = [*DROPPING, "moe.drop_policy=position"]
AUX_FREE = ["moe=deepseek", "moe.bias_update_rate=0.01", "moe.seq_aux_loss_coef=0.01"]
EXPERT_CHOICE = ["moe=expert_choice"]
# Fewer experts per ep rank than edp ranks (FSDP splits their second dim). Every token visits both experts
# (with top_k=1, 2 of the embedding's 16384 elements ended 2.5e-5 from one process's, beyond EXACT).
FEW_EXPERTS = ["moe.num_experts=2", "moe.top_k=2"]
# bf16 autocast: the last pipeline stage sends bf16 logits to the loss (torch 2.11 checks the declared dtype).
BF16 = ["train.dtype=bf16"]


def case(layout: Layout, variant: list[str], tag: str = "", extra: tuple[str, ...] = ()) -> tuple:
    """(id, world size, layout overrides, config variant shared with the reference run), the id and the
    overrides derived from the planner's Layout (every case runs BASE's 2 micro-batches)."""
    return ("-".join(filter(None, (layout.name(), tag))), layout.world, [*layout.overrides(), *extra], variant)


DP2, TP2, EP2 = (
    Layout(tp=1, pp=1, dp=2, ep=1, micro_batches=2),
    Layout(tp=2, pp=1, dp=1, ep=1, micro_batches=2),
    Layout(tp=1, pp=1, dp=2, ep=2, micro_batches=2),
)
PP2 = Layout(tp=1, pp=2, dp=1, ep=1, micro_batches=2)
CHUNKED3 = ("parallel.ep_overlap=chunked", "parallel.ep_chunks=3")
LAYOUTS = [
    # Compiled blocks fuse ops (another fp32 rounding than eager), so the reference compiles too.
    case(DP2, [*TIED, "parallel.compile=true"], "compile-tied"),
    case(replace(DP2, dp_mode="fsdp"), TIED, "tied"),
    case(TP2, MIXED, "dense-shared"),
    case(replace(TP2, sp=True), MIXED, "dense-shared"),
    case(EP2, MIXED, "shared"),
    case(EP2, DROPPING, "capacity"),
    case(EP2, AUX_FREE, "aux-free"),
    case(EP2, EXPERT_CHOICE, "expert-choice"),
    case(replace(PP2, pp_layers=(3, 1)), MIXED, "shared"),
    case(replace(PP2, schedule="gpipe"), []),
    case(PP2, BF16, "bf16"),
    case(replace(PP2, schedule="interleaved_1f1b", vpp=2), []),
    # Folding: the expert-parallel group is the tp pair (dp1), or spans tp and dp (ep4 over dp2 x tp2).
    case(replace(TP2, ep=2), [], "folded"),
    case(replace(TP2, ep=4, dp=2, dp_mode="fsdp"), [], "folded"),
    case(TP2, EXPERT_CHOICE, "expert-choice"),
    case(replace(TP2, ep=2, dp=2), []),
    case(replace(TP2, ep=2, dp=2), DROPPING, "capacity"),
    case(replace(PP2, ep=2, dp=2), []),
    case(replace(PP2, ep=2, dp=2), DROPPING_BY_POSITION, "capacity-position"),
    case(replace(PP2, ep=2, dp=2), BF16, "bf16"),
    case(replace(EP2, dp=4, dp_mode="fsdp"), []),
    # One expert per ep rank, two edp ranks: FSDP splits each expert's weights along their second dim.
    case(replace(TP2, ep=2, dp=2, dp_mode="fsdp"), FEW_EXPERTS, "one-expert-per-rank"),
    case(replace(EP2, ac="selective"), []),
    case(EP2, MIXED, "overlap-shared", ("parallel.ep_overlap=shared",)),
    case(EP2, DROPPING_BY_POSITION, "overlap-chunked3-capacity-position", CHUNKED3),
    case(replace(TP2, dp=2, ac="full", dp_mode="fsdp"), []),
    case(replace(TP2, pp=2, ep=2, dp=2), []),
]


@dataclass(frozen=True)
class Tolerance:
    loss_rtol: float | tuple[float, ...]
    """Per-step LM loss, relative (one for all steps, or one per step). It falls by >= 1% a step."""
    aux_rtol: float | tuple[float, ...]
    """Per-step sum of the balancing and z losses, relative (it changes by >= 1% a step)."""
    dropped_atol: float | tuple[float, ...]
    """Per-step dropped fraction of the token-expert pairs a step routes."""
    param_atol: float | None
    """Elementwise, against the reference (with rtol 1e-4); every tensor must move by >= 100x this."""
    param_rel: float | None = None
    """Per tensor instead: |got - ref| <= param_rel * |ref_final - ref_initial| (Frobenius norms)."""
    bias_atol: float = 1e-5
    """Aux-free expert bias, elementwise: it moves only in steps of +-moe.bias_update_rate (1e-2 here)."""


EXACT = Tolerance(loss_rtol=1e-5, aux_rtol=1e-5, dropped_atol=1e-12, param_atol=1e-5)
"""fp32 rounding only, every decision as one process's. Losses: the sqrt(n) * u estimate of
near_ties.rounding_margin over the model's 4 blocks and the output's sums of <= 256 terms (the vocabulary),
twice (layout and reference): 2 * 5 * 16 * 2^-24 = 9.5e-6, and 1/1000 of what the loss falls in a step.
Dropped pairs: equal, a count of decisions. Parameters: 1e-5 absolute is 0.3% of one Adam step (lr 3e-3),
so a missed, repeated or misdirected update shows, widened per element where Adam magnifies rounding
(`adam_amplification`); the bias: 1/1000 of one update."""

PARAM_REL_NEAR_TIE = 0.5
"""Where decisions flip, a parameter's error stays below half its movement. The failures this still guards
score >= 1: a tensor that never trained scores exactly 1, one trained on other tokens or experts ~1.4 (an
independent update of the same size). A flipped decision moves only the experts and router rows its tokens
touch, but Adam, which steps each element by about lr whatever its gradient's size, turns a small change of
a near-zero gradient into a whole step: seen up to 0.05 across two CPU instruction sets (AVX-512, AVX2)."""

BF16_ROUNDING = replace(EXACT, loss_rtol=2**-9, aux_rtol=2**-9, param_atol=None, param_rel=PARAM_REL_NEAR_TIE)
"""Under bf16 autocast (8 significant bits, unit roundoff 2**-9 ~ 2e-3) a layout's fp32 rounding differences
flip single bf16 roundings, which later steps carry on. Losses: within one bf16 rounding, 5x below the >= 1% a
step they fall (measured: pp2 loss 6e-6, aux 1.6e-4; pp2-ep2 loss 1.1e-4, aux 6e-4). Parameters: as near ties
(PARAM_REL_NEAR_TIE; measured 0.03 pp2, 0.07 pp2-ep2, in single experts' weights)."""


def tolerance(ref: dict) -> Tolerance:
    """EXACT where the reference made no decision within rounding of a tie; else an allowance derived from
    how many it made up to each step (ref["near_ties_per_step"], near_ties.py), each of which a layout may
    turn.

    A turned capacity edge swaps two tokens and keeps the dropped count; a turned top-k choice, or a token
    rerouted downstream of a turned decision, moves the count by at most one: one pair per near tie made up
    to and in that step (a flip changes the parameters every later step starts from). Each such decision
    moves one of the `assignments_per_step` assignments a step routes; the step's losses may move by that
    share. Steps before the first near tie stay EXACT. The aux-free bias: a changed load may flip the sign
    of one update, 2 * rate, in any step.
    """
    ties_S, per_step = ref["near_ties_per_step"], ref["assignments_per_step"]
    if sum(ties_S) == 0:
        return EXACT
    share_S = [n / per_step for n in itertools.accumulate(ties_S)]
    return replace(
        EXACT,
        loss_rtol=tuple(EXACT.loss_rtol + share for share in share_S),
        aux_rtol=tuple(EXACT.aux_rtol + share for share in share_S),
        dropped_atol=tuple(max(EXACT.dropped_atol, share) for share in share_S),
        param_atol=None,
        param_rel=PARAM_REL_NEAR_TIE,
        bias_atol=EXACT.bias_atol + 2 * ref["bias_update_rate"] * len(ties_S),
    )


_references: dict[tuple[str, ...], dict] = {}


def _rank_counting_near_ties(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """`helpers._rank` of one process, which also records its decisions within rounding of a tie."""
    cfg = compose(overrides)
    counter = near_ties.NearTieCounter(near_ties.rounding_margin(cfg))
    near_ties.record_near_ties(counter)
    helpers._rank(rank, world, port, overrides, out)
    result = torch.load(out, weights_only=True)
    ties_S, per_step = counter.per_step(cfg.train.steps)
    result.update(near_ties_per_step=ties_S, assignments_per_step=per_step, bias_update_rate=cfg.moe.bias_update_rate)
    torch.save(result, out)


def reference(variant: list[str], tmp_path_factory) -> dict:
    """The single-process run of BASE + `variant`, with its near-tie count (computed once per session)."""
    key = tuple(variant)
    if key not in _references:
        out = tmp_path_factory.mktemp("ref") / "ref.pt"
        overrides = [*BASE, *variant, f"run.dir={out.parent}"]
        spawn(_rank_counting_near_ties, (1, free_port(), overrides, str(out)), 1)
        _references[key] = torch.load(out, weights_only=True)
    return _references[key]


def _metric(result: dict, *names: str) -> torch.Tensor:
    return torch.tensor([sum(h[n] for n in names) for h in result["history"]], dtype=torch.float64)


def _assert_per_step(what: str, got: dict, ref: dict, names: tuple[str, ...], rtol, atol) -> None:
    """|got - ref| <= rtol * |ref| + atol for the per-step sum of `names`; rtol and atol: one for every
    step, or one per step."""
    got_S, ref_S = _metric(got, *names), _metric(ref, *names)
    bound_S = torch.as_tensor(rtol, dtype=torch.float64) * ref_S.abs() + torch.as_tensor(atol, dtype=torch.float64)
    assert ((got_S - ref_S).abs() <= bound_S).all(), (
        f"{what} per step: {got_S.tolist()} != reference {ref_S.tolist()} (allowed +-{bound_S.tolist()})"
    )


def assert_same_training(ref: dict, got: dict, tol: Tolerance | None = None) -> None:
    """Per-step losses and dropped fraction, then every parameter against the reference, whose movement
    over the run must dwarf the tolerance (`tolerance(ref)` unless given)."""
    tol = tolerance(ref) if tol is None else tol
    _assert_per_step("LM loss", got, ref, ("loss",), rtol=tol.loss_rtol, atol=0.0)
    # The z-loss term keeps the sum away from zero, so a relative tolerance suffices.
    _assert_per_step("aux losses", got, ref, ("aux_loss", "seq_aux_loss", "z_loss"), rtol=tol.aux_rtol, atol=0.0)
    # Capacity drops a token-expert pair when its expert is full, a count fixed by the top-k choices alone.
    _assert_per_step("dropped fraction", got, ref, ("dropped_frac",), rtol=0.0, atol=tol.dropped_atol)
    assert got["state"].keys() == ref["state"].keys() == got["initial"].keys()
    for name, value in ref["state"].items():
        assert torch.equal(got["initial"][name], ref["initial"][name]), f"{name} starts from other values"
        moved = value - ref["initial"][name]
        if name.endswith("expert_bias"):  # a buffer, moved only by aux-free updates of +-rate
            torch.testing.assert_close(got["state"][name], value, rtol=0, atol=tol.bias_atol, msg=name)
        elif tol.param_rel is not None:
            assert moved.norm() > 0, f"{name} never moved"
            rel = float((got["state"][name] - value).norm() / moved.norm())
            assert rel <= tol.param_rel, f"{name}: |got - ref| is {rel:.3g} of its movement (> {tol.param_rel})"
        else:
            assert moved.abs().max() >= 100 * tol.param_atol, f"{name} moved only {moved.abs().max():.3g}"
            atol = tol.param_atol * adam_amplification(ref.get("optim", {}).get(f"{name}.exp_avg_sq"))
            excess = (got["state"][name] - value).abs() - (atol + 1e-4 * value.abs())
            assert excess.max() <= 0, (
                f"{name}: {int((excess > 0).sum())} elements beyond rounding, the worst by {float(excess.max()):.3g}"
            )


ADAM_AMPLIFICATION_CAP = 30.0
"""30 x EXACT's 1e-5 is 3e-4, a third of the smallest learning rate in BASE's schedule (9.75e-4 at step 5), so
a missed or repeated Adam step still shows on every element."""


def adam_amplification(exp_avg_sq: torch.Tensor | None) -> torch.Tensor | float:
    """How much Adam magnifies an element's rounding: a gradient's rounding error scales with the sums that
    make its tensor's gradient (their RMS), and Adam divides each element's step by that element's own
    gradient RMS, sqrt(v). An element whose gradient is k times below its tensor's RMS carries k times the
    rounding (seen: 6.75x on one wo element under tp2, 1.15e-5 where its neighbours stay below 5e-7). The
    reference's final second moment stands for the run's: it averages every step's squared gradient. At
    least 1, at most ADAM_AMPLIFICATION_CAP; 1 where the optimizer keeps no second moment."""
    if exp_avg_sq is None:
        return 1.0
    rms = exp_avg_sq.mean().sqrt()
    return (rms / exp_avg_sq.sqrt().clamp_min(rms / ADAM_AMPLIFICATION_CAP)).clamp_min(1.0)


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
        if fsdp:  # experts are sharded over edp, the ranks holding the same experts: along the expert dim,
            # or the next where a rank holds fewer experts than there are edp ranks
            dim = 1 if local[0] < dims.edp else 0
            placements, axes = [f"S({dim})"], ["edp"]
            local[dim] //= dims.edp
    elif fsdp:
        placements.append(f"_S(0, {dims.tp})" if tp_dim == 0 else "S(0)")
        axes.append("dp")
        local[0] //= dims.dp_cp  # the mesh's dp axis: dp x cp ranks
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
    fsdp = p.dp_mode == "fsdp" and dims.dp_cp > 1

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
    assert_same_training(ref, got, BF16_ROUNDING if variant == BF16 else None)


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
    (*case(DP2, TIED, "without-apply_compile", ("parallel.compile=true",)), "apply_compile", "compiled: []", True),
    (*case(replace(EP2, ac="selective"), [], "without-apply_ac"), "apply_ac", "ac: [] != expected [0, 2]", True),
    # Each tp rank then holds whole weights; the MoE layers still split each sequence over tp (apply_ep),
    # without the TP plan's sequence slicing, so here the losses drift too (~2e-4 relative).
    (*case(TP2, MIXED, "without-apply_tp"), "apply_tp", "layers.0.feed_forward.w2.weight", False),
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
