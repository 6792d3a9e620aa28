"""optim=muon in one process: the 2-D update equals torch.optim.Muon's, each expert matrix is updated as a 2-D
weight of its own, the parameter split follows Moonlight (AdamW for embeddings, head, norms, router, biases),
Newton-Schulz orthogonalises, the update's RMS follows the stated rule, a debug model trains, and the
planner counts Muon's state.

    .venv/bin/pytest -q tests/unit/test_muon.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from moeyard.job.compose import compose
from moeyard.job.layout import check_layout
from moeyard.parallel.dims import ParallelDims
from moeyard.parallel.memory import probe_shards, rank_memory, stage_memory
from moeyard.parallel.muon import Muon, newton_schulz, takes_muon
from moeyard.plan.command import cmd_plan
from moeyard.train.optim import OptimConfig, build_optimizer
from tests.helpers import TINY, make_trainer

LR, WD = 0.02, 0.1


def _muon(params: list[torch.nn.Parameter], ns_dtype: torch.dtype, nesterov: bool = True) -> Muon:
    """Our Muon over `params`, with a bias beside them for its AdamW part."""
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=LR)
    return Muon(
        params,
        adamw,
        lr=LR,
        weight_decay=WD,
        momentum=0.95,
        nesterov=nesterov,
        ns_steps=5,
        rms_scale=0.2,
        ns_dtype=ns_dtype,
    )


def _steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("nesterov", [True, False])
def test_2d_update_equals_torch_muon(nesterov):
    gen = torch.Generator().manual_seed(0)
    shapes = [(48, 32), (32, 48), (40, 40)]  # wide, tall (iterated transposed) and square
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    _steps(_muon(ours, torch.bfloat16, nesterov), ours, grads)
    ref = torch.optim.Muon(
        theirs, lr=LR, weight_decay=WD, momentum=0.95, nesterov=nesterov, adjust_lr_fn="match_rms_adamw"
    )
    _steps(ref, theirs, grads)
    for a, b in zip(ours, theirs, strict=True):
        # The same operations in the same order, bf16 Newton-Schulz as torch's: equal to the bit on torch 2.13.
        # Another torch may order a sum differently: then one bf16 rounding (2^-8 relative) of each step's
        # orthogonalised entries (|O| <= 1.25), times the step's lr * 0.2 * sqrt(max(A, B)), over 3 steps.
        bound = 3 * LR * 0.2 * math.sqrt(max(a.shape)) * 1.25 * 2**-8
        torch.testing.assert_close(a, b, rtol=0, atol=bound)


def test_expert_matrices_update_like_separate_2d_weights():
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(4, 16, 24, generator=gen)
    grads = [torch.randn(4, 16, 24, generator=gen) for _ in range(3)]
    expert = torch.nn.Parameter(init.clone())
    _steps(_muon([expert], torch.float32), [expert], [[g] for g in grads])
    for e in range(4):
        alone = torch.nn.Parameter(init[e].clone())
        _steps(_muon([alone], torch.float32), [alone], [[g[e]] for g in grads])
        # Batched and single matmuls may sum in other orders: fp32 rounding of the O(1) update, times lr * scale.
        torch.testing.assert_close(expert[e], alone, rtol=0, atol=1e-5 * LR * 0.2 * math.sqrt(24))


def test_newton_schulz_orthogonalises():
    u = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(2))
    s = torch.linalg.svdvals(newton_schulz(u, 5, torch.float32))
    # Keller Jordan's coefficients leave singular values in about [0.7, 1.2] rather than exactly 1.
    assert s.min() > 0.6 and s.max() < 1.25, s


def test_update_rms_follows_the_stated_rule():
    """An orthogonalised A x B update scaled by 0.2 * sqrt(max(A, B)) has RMS about 0.2 (per unit of lr)."""
    for shape in [(64, 16), (16, 256)]:
        w = torch.nn.Parameter(torch.zeros(shape))
        opt = _muon([w], torch.float32)
        opt.param_groups[0]["weight_decay"] = 0.0
        w.grad = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        opt.step()
        rms = float(w.detach().pow(2).mean().sqrt()) / LR
        # Singular values in [0.6, 1.25] (test above) bound the RMS of the orthogonalised matrix likewise.
        assert 0.2 * 0.6 < rms < 0.2 * 1.25, (shape, rms)


def test_moonlight_split():
    assert takes_muon("layers.0.attention.wq.weight", 2)
    assert takes_muon("layers.0.feed_forward.w2.weight", 2)
    assert takes_muon("layers.1.moe.experts.w1", 3)
    assert takes_muon("layers.1.moe.shared_experts.w1.weight", 2)
    assert takes_muon("layers.1._checkpoint_wrapped_module.moe.experts.w3", 3)
    assert not takes_muon("tok_embeddings.weight", 2)
    assert not takes_muon("output.weight", 2)
    assert not takes_muon("layers.1.moe.router.gate.weight", 2)
    assert not takes_muon("layers.1.moe.experts.b1", 2)
    assert not takes_muon("layers.0.attention_norm.weight", 1)
    assert not takes_muon("layers.0.attention.wq.bias", 1)


def test_build_optimizer_dispatches():
    named = [("layers.0.attention.wq.weight", torch.nn.Parameter(torch.zeros(8, 8)))]
    named += [("norm.weight", torch.nn.Parameter(torch.ones(8)))]
    assert isinstance(build_optimizer(named, OptimConfig(), torch.device("cpu")), torch.optim.AdamW)
    opt = build_optimizer(named, OptimConfig(name="muon"), torch.device("cpu"))
    assert isinstance(opt, Muon)
    assert [g.get("muon", False) for g in opt.param_groups] == [True, False]
    assert [p for g in opt.param_groups for p in g["params"]] == [named[0][1], named[1][1]]


@pytest.mark.parametrize(
    ("field", "value"), [("muon_momentum", 1.0), ("muon_ns_steps", 0), ("muon_rms_scale", 0.0), ("name", "sgd")]
)
def test_bad_muon_fields_are_named(field, value):
    with pytest.raises(ValueError, match=f"optim.{field}={value}"):
        OptimConfig(**{field: value}).check()


def test_debug_model_trains_with_muon(tmp_path):
    cfg = compose([*TINY, "optim=muon", "train.steps=8", "checkpoint.every=0", f"run.dir={tmp_path}"])
    trainer = make_trainer(cfg)
    history = trainer.fit()
    losses = [h["loss"] for h in history]
    assert losses[-1] < losses[0] - 0.3, losses  # trains: falls by 0.56 here (a lost or misdirected update: no fall)
    state = trainer.optimizer.state
    for name, p in trainer.pm.named_parameters():
        keys = set(state[p])
        assert keys == ({"momentum_buffer"} if takes_muon(name, p.ndim) else {"step", "exp_avg", "exp_avg_sq"}), name


def test_plan_counts_muon_state(tmp_path):
    """`moeyard plan`'s state bytes (from shapes) and rank_memory's (from the built rank) equal what a trained
    rank holds: fp32 parameters and gradients, one momentum buffer per Muon element, AdamW's two moments and
    a step counter per other tensor."""
    cfg = compose([*TINY, "optim=muon", "train.steps=1", "checkpoint.every=0", f"run.dir={tmp_path}"])
    trainer = make_trainer(cfg)
    trainer.fit()
    named = trainer.pm.named_parameters()
    held = sum(2 * p.numel() * p.element_size() for _, p in named)  # parameters and their gradients
    held += sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values() for t in s.values())
    counted = rank_memory(trainer.pm, bf16=False, muon=True)
    assert counted.state_bytes == held
    assert 0 < counted.muon_params < counted.params
    dims = ParallelDims.from_config(cfg.parallel, 1)
    probe = probe_shards(cfg.model, cfg.moe, cfg.parallel, 1, 1)
    planned = stage_memory(probe, cfg.model, cfg.parallel, dims, 0, False, muon=True)
    assert planned.state_bytes == held
    adamw = stage_memory(probe, cfg.model, cfg.parallel, dims, 0, False)
    assert adamw.state_bytes - planned.state_bytes == 4 * counted.muon_params + 4 * counted.muon_tensors


@pytest.mark.parametrize("parallel", [["parallel.dp_mode=zero1"], ["parallel.param_dtype=bf16", "train.dtype=bf16"]])
def test_layouts_whose_optimizer_is_zero_refuse_muon(parallel):
    """parallel/zero.py's AdamW steps fp32 master slices: Muon is refused there, before any rank starts."""
    cfg = compose([*TINY, "optim=muon", "parallel.dp=2", *parallel])
    with pytest.raises(ValueError, match="optim.name=muon does not run with parallel.dp_mode="):
        check_layout(cfg, ParallelDims.from_config(cfg.parallel, 2))
    check_layout(compose([*TINY, "parallel.dp=2", *parallel]), ParallelDims.from_config(cfg.parallel, 2))


def test_moeyard_plan_counts_muon_state(capsys):
    """`moeyard plan optim=muon` predicts one 4 B buffer instead of AdamW's two per element of Muon's parameters:
    every layout's optimizer bytes about halve, a little less (embeddings, head and routers, about 0.6% of
    Mixtral's elements, keep AdamW's)."""
    cluster = ["model=mixtral_8x7b", "cluster.nodes=1", "cluster.gpus_per_node=2", "cluster.gpu=h100"]
    per_layout = {}
    for optim in ("adamw", "muon"):
        assert cmd_plan([*cluster, f"optim={optim}", "--json"]) == 0
        layouts = json.loads(capsys.readouterr().out)["layouts"]
        per_layout[optim] = {x["layout"]: x["memory_bytes"]["optimizer"] for x in layouts}
    zero1 = {name for name in per_layout["adamw"] if " zero1 " in name}  # refused with Muon (check_layout)
    assert per_layout["muon"].keys() == per_layout["adamw"].keys() - zero1
    for name, muon in per_layout["muon"].items():
        adamw = per_layout["adamw"][name]
        saved = adamw - muon
        assert 0.45 * adamw < saved < 0.5 * adamw, (name, adamw, saved)
