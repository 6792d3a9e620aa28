"""ZeRO memory modes train like one process, with their sharding in place, and resume from their checkpoints.

parallel.dp_mode=zero1 (AdamW state sharded over dp/edp, parallel/zero.py) and zero2 (FSDP2 without resharding
after forward) on dp2, and composed on 4 ranks (pp2 x dp2 zero1, tp2 x dp2 x ep2 zero1 and zero2), each
against the golden suite's one-process fp32 run (test_golden.py's reference, tolerance and layout checks), and
with AdamW's gathered moments equal to one process's. bf16 parameters with fp32 masters
(parallel.param_dtype=bf16) on dp2 zero1 against one process with bf16 parameters, within
test_golden.BF16_ROUNDING: the two differ by bf16 roundings of gradients summed in another order (two experts
that every token visits: no routing decision for those roundings to turn). Every rank reports its optimizer's
state: zero1's AdamW moments hold this rank's 1/dp (experts 1/edp) of its parameters, and zero2's FSDP units
keep their parameters gathered after forward; and its model state (parameters, the gradients as the optimizer
step begins, moments, step counters, fp32 masters) equals the planner's count to the byte (parallel/memory.py,
as tests/multiproc/test_plan_cpu.py checks the other modes).

Resume: the saving runs save at step 2; a bf16 zero1 run resumed from its save on the same layout repeats the
uninterrupted run's last steps bitwise (fp32 masters, moments and step counts round-trip), and a tp2 x ep2 x
dp2 zero1 save resumed as FSDP (optimizer slices resharded into FSDP shards by DCP) stays within fp32 rounding
of its uninterrupted run. Layouts of one world size share one spawned process group.

    .venv/bin/pytest -q tests/multiproc/test_golden_zero.py   # ~1.5 min on 2 idle cores
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from moeyard.job.compose import compose
from moeyard.parallel.data_parallel import is_expert_param
from moeyard.parallel.dims import Axis
from moeyard.parallel.state import full_optimizer_state, full_state_dict
from moeyard.plan.planner import layout_of, make_planner
from tests.helpers import free_port, layout_facts, local_rank_env, make_trainer, spawn
from tests.multiproc import test_golden as golden

# Two experts, both visited by every token: no routing decision that bf16 rounding could turn (in the default
# top-2 of 8 experts, rounding-close choices flip under bf16 and move the aux losses by up to 1% in 5 steps),
# so layout and reference differ by bf16 rounding alone.
BF16_PARAMS = ["train.dtype=bf16", "parallel.param_dtype=bf16", *golden.FEW_EXPERTS]
SAVE = ["checkpoint.enabled=true", "checkpoint.every=2", "checkpoint.keep=3"]  # step 2 outlives the last save
DP2 = ["parallel.dp=2"]
TWO_RANKS = {
    "dp2-zero1": ([*DP2, "parallel.dp_mode=zero1"], []),
    "dp2-zero2": ([*DP2, "parallel.dp_mode=zero2"], []),
    "dp2-zero1-bf16-params": ([*DP2, "parallel.dp_mode=zero1", *SAVE], BF16_PARAMS),
}
TP2_EP2_DP2 = ["parallel.tp=2", "parallel.ep=2", *DP2]
FOUR_RANKS = {
    "pp2-dp2-zero1": (["parallel.pp=2", *DP2, "parallel.dp_mode=zero1"], []),
    "tp2-ep2-dp2-zero2": ([*TP2_EP2_DP2, "parallel.dp_mode=zero2"], []),
    "tp2-ep2-dp2-zero1": ([*TP2_EP2_DP2, "parallel.dp_mode=zero1", *SAVE], []),
}
RESUMED = {
    # name: (the case whose step-2 save it resumes, its own layout overrides)
    "dp2-zero1-bf16-params-resumed": ("dp2-zero1-bf16-params", [*DP2, "parallel.dp_mode=zero1"]),
    "tp2-ep2-dp2-zero1-resumed-as-fsdp": ("tp2-ep2-dp2-zero1", [*TP2_EP2_DP2, "parallel.dp_mode=fsdp"]),
}


def zero_facts(trainer) -> dict:
    """This rank's optimizer and FSDP facts: elements of AdamW's exp_avg, the dtypes of parameters and
    masters, its dp and edp positions, and whether each FSDP unit reshards after forward."""
    opt = trainer.optimizer
    moments = sum(s["exp_avg"].numel() for s in opt.state.values() if "exp_avg" in s)
    masters = {str(m.dtype) for g in opt.param_groups for m in g["params"]}
    emesh = trainer.pm.expert_mesh
    units = [m for part in trainer.pm.parts for m in part.modules() if isinstance(m, FSDPModule)]
    # FSDP2 keeps no public getter: a unit that reshards after forward has a post-forward mesh.
    reshards = [
        m._get_fsdp_state()._fsdp_param_group._reshard_after_forward for m in units if m is not trainer.pm.parts[0]
    ]
    return {
        "optimizer": type(opt).__name__,
        "moments": moments,
        "masters": sorted(masters),
        "params": sorted({str(p.dtype) for _, p in trainer.pm.named_parameters()}),
        "dp_rank": trainer.dp_rank,
        "edp_rank": emesh[Axis.EDP.value].get_local_rank() if emesh is not None else 0,
        "reshards": reshards,
    }


def _train(rank: int, world: int, overrides: list[str]) -> dict:
    trainer = make_trainer(compose(["train.log_every=1", *overrides]))
    initial = full_state_dict(trainer.pm)
    grads: dict[int, int] = {}  # the gradients' storages as the last optimizer step began: (address, bytes)

    def hook(*_) -> None:
        grads.clear()
        grads.update(_storage(p.grad) for _, p in trainer.pm.named_parameters() if p.grad is not None)

    trainer.optimizer.register_step_pre_hook(hook)
    history = trainer.fit()
    result = {"history": history, "state": full_state_dict(trainer.pm), "initial": initial}
    result["optim"] = full_optimizer_state(trainer.pm, trainer.optimizer)
    state_bytes = model_state_bytes(trainer) + sum(grads.values())
    facts = [None] * world
    dist.all_gather_object(facts, (layout_facts(trainer), {**zero_facts(trainer), "state_bytes": state_bytes}))
    result["layout"], result["zero"] = [f[0] for f in facts], [f[1] for f in facts]
    return result


def _storage(t: torch.Tensor) -> tuple[int, int]:
    st = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
    return st.data_ptr(), st.nbytes()


def model_state_bytes(trainer) -> int:
    """Bytes of this rank's parameters and optimizer state (moments, step counters, masters that are not
    views of the parameters), each storage once."""
    params = dict(_storage(p) for _, p in trainer.pm.named_parameters())
    opt = trainer.optimizer
    state = dict(_storage(v) for s in opt.state.values() for v in s.values())
    state.update(m for m in (_storage(t) for g in opt.param_groups for t in g["params"]) if m[0] not in params)
    return sum(params.values()) + sum(state.values())


def _rank_cases(rank: int, world: int, port: int, cases: dict[str, list[str]], out: str) -> None:
    """Trains each case in turn in this one process group; rank 0 saves every case's result."""
    local_rank_env(rank, world, port)
    results = {name: _train(rank, world, overrides) for name, overrides in cases.items()}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def _overrides(layout: list[str], variant: list[str], run_dir) -> list[str]:
    return [*golden.BASE, *variant, *layout, f"run.dir={run_dir}"]


def _run_group(world: int, trained: dict, root) -> dict:
    """Trains `trained`'s cases, then the RESUMED cases whose source is among them, in one spawned group."""
    cases = {name: _overrides(layout, variant, root / name) for name, (layout, variant) in trained.items()}
    for name, (source, layout) in RESUMED.items():
        if source in trained:
            resume = f"train.resume={root / source / 'checkpoints' / 'step_2'}"
            cases[name] = [*_overrides(layout, trained[source][1], root / name), resume]
    out = root / "results.pt"
    spawn(_rank_cases, (world, free_port(), cases, str(out)), world)
    return {"results": torch.load(out, weights_only=True), "cases": cases}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return _run_group(2, TWO_RANKS, tmp_path_factory.mktemp("zero2ranks"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    return _run_group(4, FOUR_RANKS, tmp_path_factory.mktemp("zero4ranks"))


def _as_fsdp(overrides: list[str]) -> list[str]:
    """zero2 is FSDP2's sharding (golden.expected_layout knows it as dp_mode=fsdp)."""
    return [o.replace("dp_mode=zero2", "dp_mode=fsdp") for o in overrides]


def assert_zero_applied(overrides: list[str], world: int, got: dict) -> None:
    """The layout's parameters as golden.expected_layout says, and per rank: zero1's moments are its own
    torch.chunk slice of each local parameter (dense over dp, experts over edp); zero2's units keep their
    parameters after forward; bf16 parameters have fp32 masters."""
    golden.assert_layout_applied(_as_fsdp(overrides), world, got)
    cfg = compose([*overrides, "cluster.gpu=cpu"])
    p = cfg.parallel
    edp = p.dp * p.tp // p.ep
    peaks = make_planner(cfg, measure=False).predict(layout_of(cfg, world)).peaks
    for rank, (facts, zero) in enumerate(zip(got["layout"], got["zero"], strict=True)):
        predicted = peaks[rank // (world // p.pp)].model_state  # pp is the outermost mesh axis
        assert zero["state_bytes"] == predicted, f"rank {rank}: model state {zero['state_bytes']} B != {predicted} B"
        want_params = ["torch.bfloat16"] if p.param_dtype == "bf16" else ["torch.float32"]
        assert zero["params"] == want_params, (rank, zero)
        if p.dp_mode == "zero2":
            assert zero["optimizer"] == "AdamW" and zero["reshards"] and not any(zero["reshards"]), (rank, zero)
            continue
        assert zero["optimizer"] == "ZeroAdamW" and zero["masters"] == ["torch.float32"], (rank, zero)
        owned = 0
        for name, (_, _, _, shape) in facts["params"].items():
            ways, index = (edp, zero["edp_rank"]) if is_expert_param(name) else (p.dp, zero["dp_rank"])
            rows = -(-shape[0] // ways)
            owned += max(0, min(shape[0], (index + 1) * rows) - index * rows) * math.prod(shape[1:])
        assert zero["moments"] == owned < facts["numel"], (rank, zero["moments"], owned, facts["numel"])


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(TWO_RANKS))
def test_two_rank_zero_trains_like_one_process(name, two_ranks, tmp_path_factory):
    layout, variant = TWO_RANKS[name]
    got = two_ranks["results"][name]
    assert len(got["history"]) == 5
    assert_zero_applied(two_ranks["cases"][name], 2, got)
    ref = golden.reference(variant, tmp_path_factory)  # BF16_PARAMS: one process with bf16 params and masters
    golden.assert_same_training(ref, got, golden.BF16_ROUNDING if variant == BF16_PARAMS else None)
    if variant != BF16_PARAMS:
        assert_same_moments(ref["optim"], got["optim"])


def assert_same_moments(ref: dict, got: dict) -> None:
    """AdamW's gathered state equals one process's: step counts exactly, each moment within 1e-3 of its norm.
    The moments are running means of gradients that differ from the reference's by fp32 rounding (the
    losses' 1e-5 relative); a slice stepped on the wrong rank, or left unstepped, is off by order 1."""
    assert got.keys() == ref.keys() and got, sorted(got.keys() ^ ref.keys())[:5]
    for key, value in ref.items():
        if key.endswith(".step"):
            assert torch.equal(got[key], value), key
        else:
            assert (got[key] - value).norm() <= 1e-3 * value.norm(), key


@pytest.mark.multiproc
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_composed_zero_trains_like_one_process(name, four_ranks, tmp_path_factory):
    layout, variant = FOUR_RANKS[name]
    got = four_ranks["results"][name]
    assert_zero_applied(four_ranks["cases"][name], 4, got)
    ref = golden.reference(variant, tmp_path_factory)
    golden.assert_same_training(ref, got)
    assert_same_moments(ref["optim"], got["optim"])


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_bf16_masters_and_moments_resume_bitwise(two_ranks):
    """Steps 3-5 after resuming the step-2 save repeat the uninterrupted run's exactly: the fp32 masters (not
    the bf16 parameters), both moments and the step counts came back."""
    full = two_ranks["results"]["dp2-zero1-bf16-params"]
    resumed = two_ranks["results"]["dp2-zero1-bf16-params-resumed"]
    assert [h["step"] for h in resumed["history"]] == [3, 4, 5]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"][2:]]
    differ = [n for n, t in full["state"].items() if not torch.equal(t, resumed["state"][n])]
    assert not differ, f"{len(differ)} parameters differ after resuming: {differ[:5]}"


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_zero1_state_reshards_into_fsdp(four_ranks):
    """The tp2 x ep2 x dp2 zero1 save resumed as FSDP: DCP reads each FSDP shard's moments from the saved zero1
    slices (dense ones nested inside tp shards, experts' over edp), and steps 3-5 follow the uninterrupted
    zero1 run within fp32 rounding (golden.EXACT); a lost or misplaced moment changes an Adam step by about
    lr, 300x the parameter tolerance."""
    full = four_ranks["results"]["tp2-ep2-dp2-zero1"]
    resumed = four_ranks["results"]["tp2-ep2-dp2-zero1-resumed-as-fsdp"]
    tail = {**full, "history": full["history"][2:], "initial": resumed["initial"]}
    assert [h["step"] for h in resumed["history"]] == [3, 4, 5]
    golden.assert_same_training(tail, resumed, golden.EXACT)
