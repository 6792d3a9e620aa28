"""Megatron-Core's MoE routing functions as a second outside reference, plus two regression guards.

Our router is checked against `megatron.core.transformer.moe.moe_utils` (megatron-core 0.16, CPU, no
TransformerEngine) wherever the two define the same thing, on small seeded inputs in fp32:

- softmax top-k (`topk_routing_with_score_function`): `norm_topk_prob=False` is Megatron's pre-softmax
  (softmax over all E, then top-k); `norm_topk_prob=True` is its default (top-k logits, softmax over those K),
  which is the same renormalisation; `route_scale` is its `scaling_factor`. Same experts, weights, gradients.
- sigmoid top-k with expert bias and group-limited selection (DeepSeek-V3): same experts and weights where
  Megatron scores a group by its top (K / topk_groups) experts and K / topk_groups == 2, as ours always does
  with two; a hand case shows the two group scores differing when K / topk_groups != 2.
- capacity (`get_capacity`, `apply_router_token_dropping`) on ONE sequence: Megatron counts capacity over
  all tokens the router sees in a micro-batch (and so depends on the batch split); ours counts it per
  sequence, which is the same thing only when a batch is one sequence. `probs` equals our `probability`
  policy. Megatron's `position` keeps whichever C routed tokens `torch.topk` returns among tied ones, an
  order PyTorch does not specify (on CPU it is not the earliest tokens), so only the kept counts coincide.
- Switch balancing loss, sequence-level balancing loss and z-loss: same values and gradients with
  coefficient 1 (ours are unscaled; the MoE layer applies the coefficients).

Two regressions of bugs Megatron-Core fixed in 2026 (NVIDIA/Megatron-LM #5956 and #5798/#5696):
- expert gradients must not carry a factor of the EP size: two gloo ranks (dp=2 with ep=2) give the same
  expert gradients and global gradient norm as one process, for replicated and FSDP2 data parallelism;
- the sequence-level balancing loss, value and gradient, must not depend on how a batch is split into
  micro-batches or data-parallel ranks.

The Megatron comparisons skip where megatron-core is not installed; the regression tests always run.

Run: .venv/bin/pytest -q tests/unit/test_megatron_reference.py
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.layer import MoELayer
from moeyard.moe.model import Transformer, init_weights
from moeyard.moe.router import Router, Routing, capacity_per_sequence
from moeyard.parallel.config import ParallelConfig
from moeyard.parallel.data_parallel import finish_grads, is_expert_param
from moeyard.parallel.dims import Axis, ParallelDims
from moeyard.parallel.grads import global_grad_norm
from moeyard.parallel.parallelize import build_parallel_model
from tests.helpers import spawn

TOL = 1e-6
"""fp32 tolerance on O(1) weights and losses."""


@pytest.fixture(scope="module")
def mcore():
    """megatron.core.transformer.moe.moe_utils, or a skip; its import warns about absent TE/apex."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.transformer.moe.moe_utils")


def seeded_logits(*shape: int, seed: int, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(requires_grad)


def route(logits_GSE: torch.Tensor, bias_E: torch.Tensor | None = None, **cfg) -> Routing:
    """Our Router on given logits: an identity gate makes its logits exactly `logits_GSE` [G, S, E]."""
    E = logits_GSE.shape[-1]
    router = Router(E, MoEConfig(num_experts=E, **cfg))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E))
        if bias_E is not None:
            router.expert_bias.copy_(bias_E)
    return router(logits_GSE)


def dense(routing: Routing, T: int, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our kept assignments in Megatron's form: combine weights [T, E] (differentiable) and a bool map."""
    token_A, expert_A, weight_A = routing.kept()
    index = (token_A, expert_A)
    probs_TE = torch.zeros(T, E).index_put(index, weight_A)
    map_TE = torch.zeros(T, E, dtype=torch.bool).index_put(index, torch.tensor(True))
    return probs_TE, map_TE


def assert_same_routing(ours: Routing, probs_TE: torch.Tensor, map_TE: torch.Tensor) -> None:
    our_probs_TE, our_map_TE = dense(ours, *map_TE.shape)
    assert torch.equal(our_map_TE, map_TE)
    torch.testing.assert_close(our_probs_TE, probs_TE, rtol=0, atol=TOL)


@pytest.mark.parametrize("route_scale", [1.0, 2.5])
@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_softmax_topk_matches(mcore, norm_topk_prob, route_scale):
    # Megatron applies an expert bias only to sigmoid scores; ours steers softmax selection too. No bias here.
    T, E, K = 24, 8, 2
    logits_TE = seeded_logits(T, E, seed=1, requires_grad=True)
    ours = route(logits_TE.view(1, T, E), top_k=K, norm_topk_prob=norm_topk_prob, route_scale=route_scale)
    probs_TE, map_TE = mcore.topk_routing_with_score_function(
        logits_TE, K, use_pre_softmax=not norm_topk_prob, scaling_factor=route_scale, score_function="softmax"
    )
    assert_same_routing(ours, probs_TE, map_TE)
    cotangent_TE = seeded_logits(T, E, seed=2)
    (ours_grad,) = torch.autograd.grad((dense(ours, T, E)[0] * cotangent_TE).sum(), logits_TE)
    (theirs_grad,) = torch.autograd.grad((probs_TE * cotangent_TE).sum(), logits_TE)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=TOL)


@pytest.mark.parametrize(
    ("E", "top_k", "n_groups", "topk_groups"),
    [(16, 4, 1, 1), (16, 4, 4, 2), (32, 8, 8, 4)],
    ids=["no-groups", "4-groups-pick-2", "deepseek-v3-ratios"],
)
def test_sigmoid_grouped_topk_with_bias_matches(mcore, E, top_k, n_groups, topk_groups):
    # Both renormalise the K sigmoid scores (ours: norm_topk_prob, the default); for K=1 Megatron does not,
    # which is our norm_topk_prob=False. The bias steers selection only, in both.
    T = 32
    logits_TE = seeded_logits(T, E, seed=3)
    bias_E = 0.3 * seeded_logits(E, seed=4)
    cfg = dict(router="sigmoid_topk", top_k=top_k, n_groups=n_groups, topk_groups=topk_groups, route_scale=2.5)
    ours = route(logits_TE.view(1, T, E), bias_E, **cfg)
    groups = dict(num_groups=n_groups, group_topk=topk_groups) if n_groups > 1 else {}
    probs_TE, map_TE = mcore.topk_routing_with_score_function(
        logits_TE, top_k, scaling_factor=2.5, score_function="sigmoid", expert_bias=bias_E, **groups
    )
    assert_same_routing(ours, probs_TE, map_TE)
    # The case must exercise what it claims: the bias changes some choices, and groups limit them.
    unbiased_map_TE = dense(route(logits_TE.view(1, T, E), **cfg), T, E)[1]
    assert not torch.equal(unbiased_map_TE, map_TE)
    groups_used_T = map_TE.view(T, n_groups, -1).any(-1).sum(-1)
    assert int(groups_used_T.max()) <= topk_groups


def test_group_score_definition_differs(mcore):
    # Ours scores a group by its best two experts (DeepSeek-V3); Megatron by its best K / topk_groups. With
    # K=2 over 2 of 4 groups Megatron uses the single best expert: group 0 (0.9) and group 1 (0.6) win,
    # where ours picks group 1 (0.6 + 0.55) and group 2 (0.5 + 0.45) over group 0 (0.9 + 0.01).
    scores_E = torch.tensor([0.9, 0.01, 0.6, 0.55, 0.5, 0.45, 0.1, 0.1])
    logits_TE = torch.logit(scores_E)[None]
    cfg = dict(router="sigmoid_topk", top_k=2, n_groups=4, topk_groups=2, norm_topk_prob=True)
    ours = route(logits_TE.view(1, 1, 8), **cfg)
    _, map_TE = mcore.topk_routing_with_score_function(
        logits_TE, 2, num_groups=4, group_topk=2, score_function="sigmoid", expert_bias=torch.zeros(8)
    )
    assert sorted(ours.kept()[1].tolist()) == [2, 3]
    assert map_TE[0].nonzero().flatten().tolist() == [0, 2]


def test_capacity_number_matches(mcore):
    # Both are ceil(factor * tokens * K / E), over one sequence (ours) or one micro-batch (Megatron).
    for E, K, S, factor in [(8, 2, 16, 1.0), (8, 2, 24, 1.25), (16, 4, 100, 0.5), (64, 6, 4096, 1.5), (4, 1, 7, 2.0)]:
        cfg = MoEConfig(num_experts=E, top_k=K, capacity_factor=factor)
        assert capacity_per_sequence(cfg, S) == mcore.get_capacity(S * K, E, factor)
    # The two evaluate the product in a different order, so at an exact integer float rounding can differ
    # by one slot: 1.1 * 1000 * 6 / 8 = 825, while Megatron's (6000 / 8) * 1.1 rounds up to 825.0000000000001.
    cfg = MoEConfig(num_experts=8, top_k=6, capacity_factor=1.1)
    assert (capacity_per_sequence(cfg, 1000), mcore.get_capacity(6000, 8, 1.1)) == (825, 826)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_probability_drop_matches_on_one_sequence(mcore, router, factor):
    S, E, K = 32, 8, 2
    logits_SE = seeded_logits(S, E, seed=5)
    ours = route(logits_SE.view(1, S, E), router=router, top_k=K, capacity_factor=factor, drop_policy="probability")
    score_function = "sigmoid" if router == "sigmoid_topk" else "softmax"
    probs_SE, map_SE = mcore.topk_routing_with_score_function(logits_SE, K, score_function=score_function)
    kept_probs_SE, kept_map_SE = mcore.apply_router_token_dropping(probs_SE, map_SE, K, factor, drop_policy="probs")
    assert_same_routing(ours, kept_probs_SE, kept_map_SE)
    assert int(kept_map_SE.sum()) < int(map_SE.sum()), "the case must drop something"


@pytest.mark.parametrize("top_k", [1, 2])
def test_position_drop_keeps_the_same_counts(mcore, top_k):
    S, E, factor = 32, 8, 1.0
    logits_SE = seeded_logits(S, E, seed=6)
    ours = route(logits_SE.view(1, S, E), top_k=top_k, capacity_factor=factor, drop_policy="position")
    probs_SE, map_SE = mcore.topk_routing_with_score_function(logits_SE, top_k, score_function="softmax")
    _, kept_map_SE = mcore.apply_router_token_dropping(probs_SE, map_SE, top_k, factor, drop_policy="position")
    capacity = capacity_per_sequence(MoEConfig(num_experts=E, top_k=top_k, capacity_factor=factor), S)
    assert capacity == mcore.get_capacity(S * top_k, E, factor)
    assert torch.equal(ours.routed_E, map_SE.sum(0))
    assert torch.equal(ours.kept_E, kept_map_SE.sum(0))
    assert torch.equal(ours.kept_E, ours.routed_E.clamp(max=capacity))
    assert not (kept_map_SE & ~map_SE).any()
    # Which tokens: Megatron takes torch.topk of the 0/1 routing map, whose order among tied ones PyTorch
    # leaves unspecified, so its masks are not compared. Ours keeps the earliest positions, all first choices
    # before any second choice (GShard); for K=1 that is plain position order, checked here directly.
    if top_k == 1:
        earliest_SE = map_SE & (map_SE.int().cumsum(0) <= capacity)
        assert torch.equal(dense(ours, S, E)[1], earliest_SE)


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_aux_and_z_loss_match(mcore, router):
    # Same definition: E * sum_e f_e * P_e, f_e over the K*T routed assignments before capacity, P_e the
    # mean (normalised) score. Megatron counts f_e on an unbiased, ungrouped top-k summed over tp/cp (its
    # `global_aux_loss` also over dp, as a running mean over micro-batches); ours counts the actual selection
    # summed over dp, so the two coincide without bias and groups, as here. Capacity is on: both count
    # assignments before dropping.
    G, S, E, K = 2, 16, 8, 2
    logits_TE = seeded_logits(G * S, E, seed=7, requires_grad=True)
    ours = route(logits_TE.view(G, S, E), router=router, top_k=K, capacity_factor=0.5)
    score_function = "sigmoid" if router == "sigmoid_topk" else "softmax"
    map_TE, scores_TE = mcore.compute_routing_scores_for_aux_loss(logits_TE, K, score_function)
    aux = mcore.switch_load_balancing_loss_func(scores_TE, map_TE.sum(0), G * S, K, E, 1.0)
    z = mcore.z_loss_func(logits_TE, 1.0)
    assert torch.equal(ours.routed_E, map_TE.sum(0))
    for mine, theirs in ((ours.aux_loss, aux), (ours.z_loss, z)):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=TOL)
        (mine_grad,) = torch.autograd.grad(mine, logits_TE, retain_graph=True)
        (theirs_grad,) = torch.autograd.grad(theirs, logits_TE, retain_graph=True)
        torch.testing.assert_close(mine_grad, theirs_grad, rtol=0, atol=TOL)


def megatron_seq_aux_loss(mcore, logits_BSE: torch.Tensor, K: int, score_function: str) -> torch.Tensor:
    """TopKRouter._apply_seq_aux_loss (router.py) with one tp/cp rank: Megatron's tokens are ordered [S, B],
    so [S, B*E] turns each (sequence, expert) pair into a column of the Switch loss, divided by B."""
    B, S, E = logits_BSE.shape
    logits_TE = logits_BSE.transpose(0, 1).reshape(S * B, E)
    map_TE, scores_TE = mcore.compute_routing_scores_for_aux_loss(logits_TE, K, score_function)
    tokens_per_column = map_TE.reshape(S, B * E).sum(0)
    return mcore.switch_load_balancing_loss_func(scores_TE.reshape(S, B * E), tokens_per_column, S, K, E, 1.0) / B


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_sequence_aux_loss_matches(mcore, router):
    # Both are the mean over sequences of DeepSeek-V3's sum_e f_e * P_e. As for the batch loss, Megatron's
    # f_e counts an unbiased top-k and ours the selection with bias and groups; none are used here.
    B, S, E, K = 3, 16, 8, 2
    logits_BSE = seeded_logits(B, S, E, seed=8, requires_grad=True)
    ours = route(logits_BSE, router=router, top_k=K, seq_aux_loss_coef=1e-4).seq_aux_loss  # a weighted term
    score_function = "sigmoid" if router == "sigmoid_topk" else "softmax"
    theirs = megatron_seq_aux_loss(mcore, logits_BSE, K, score_function)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)
    (ours_grad,) = torch.autograd.grad(ours, logits_BSE)
    (theirs_grad,) = torch.autograd.grad(theirs, logits_BSE)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=TOL)


def test_sequence_aux_loss_does_not_depend_on_batch_split():
    """Regression for Megatron-LM #5798/#5696: the seq aux loss and its gradient depended on micro-batch size.

    The trainer backpropagates each micro-batch's mean loss and scales gradients by 1/M, and data-parallel
    ranks average gradients; the seq aux loss uses no cross-rank counts, so a dp split is the same as a
    micro-batch split. Whole batch, halves and single sequences must give one value and one gradient.
    """
    B, S, D, E = 4, 8, 16, 8
    cfg = MoEConfig(
        num_experts=E,
        top_k=2,
        expert_hidden=8,
        router="sigmoid_topk",
        n_groups=4,
        topk_groups=2,
        capacity_factor=1.0,
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
        seq_aux_loss_coef=0.1,
    )
    torch.manual_seed(0)
    layer = MoELayer(D, cfg)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(std=0.3)
        layer.router.expert_bias.copy_(0.1 * seeded_logits(E, seed=9))
    x_BSD = seeded_logits(B, S, D, seed=10)

    def split_into(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        layer.zero_grad()
        for x_bSD in x_BSD.chunk(m):
            out = layer(x_bSD)
            out.backward(torch.zeros_like(out))  # only the attached balancing loss reaches the router
        seq_aux = torch.stack([s["seq_aux_loss"] for s in layer.drain_stats()]).mean()
        return seq_aux, layer.router.gate.weight.grad / m

    whole_loss, whole_grad = split_into(1)
    assert whole_grad.abs().max() > 1e-3
    for m in (2, 4):
        loss, grad = split_into(m)
        torch.testing.assert_close(loss, whole_loss, rtol=0, atol=TOL)
        torch.testing.assert_close(grad, whole_grad, rtol=0, atol=TOL * float(whole_grad.abs().max()))
    # The guard is sensitive: scoring the batch as one long sequence (Megatron's packed-sequence bug) differs.
    with torch.no_grad():
        one_sequence = layer.router(x_BSD.reshape(1, B * S, D)).seq_aux_loss
    assert abs(float(one_sequence - whole_loss)) > 1e-3


WORLD, SEED = 2, 3
MODEL = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=32, max_seq_len=16)
MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=16)


def _loss(model: torch.nn.Module, tokens_BS: torch.Tensor) -> torch.Tensor:
    logits_BSV = model(tokens_BS[:, :-1])
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), tokens_BS[:, 1:].flatten())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _ep_grads_worker(rank: int, dp_mode: str, out: str) -> None:
    dist.init_process_group("gloo")
    tokens_BS = torch.randint(0, MODEL.vocab_size, (4, 13), generator=torch.Generator().manual_seed(SEED))
    ref = Transformer(MODEL, MOE)
    init_weights(ref, SEED)
    _loss(ref, tokens_BS).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    pcfg = ParallelConfig(ep=WORLD, dp_mode=dp_mode)
    dims = ParallelDims.from_config(pcfg, WORLD)
    meshes = dims.build_mesh("cpu"), dims.build_expert_mesh("cpu")
    pm = build_parallel_model(MODEL, MOE, pcfg, dims, *meshes, torch.device("cpu"), SEED)
    dp_rank, ep_rank = pm.mesh[Axis.DP.value].get_local_rank(), pm.expert_mesh[Axis.EP.value].get_local_rank()
    _loss(pm.parts[0], tokens_BS.chunk(dims.dp)[dp_rank]).backward()
    finish_grads(pm.parts, dp_mode, pm.groups.dp, pm.groups.edp, dims.dp, dims.edp)

    errors, local_experts = {}, set()
    for name, param in pm.named_parameters():
        want = ref_grads[name]
        if is_expert_param(name):
            got = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            local_experts.add(got.shape[0])
            want = want.chunk(dims.ep)[ep_rank]
        else:
            got = _full(param.grad)
        errors[name] = float((got - want).abs().max() / want.abs().max())
    ref_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in ref_grads.values()]))
    norm = global_grad_norm(pm.named_parameters(), pm.groups.ep, pm.groups.pp)
    torch.save(
        {"errors": errors, "local_experts": sorted(local_experts), "norm_ratio": float(norm / ref_norm)},
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


@pytest.mark.multiproc
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dp_mode", ["replicate", "fsdp"])
def test_expert_grads_do_not_scale_with_ep(dp_mode, tmp_path):
    """Regression for Megatron-LM #5956: expert gradients came out ep_size times too large.

    An expert's local gradient already sums the tokens of its whole ep group (the all-to-all brings them),
    so averaging it over the expert-data-parallel axis alone leaves a factor of ep. Adam is nearly blind to a
    uniform gradient scale, so loss curves hide it; gradients and the clipping norm are compared here.
    dp=2 with ep=2 on two gloo ranks against one process; balancing losses on (they reduce over dp).
    """
    out = str(tmp_path / "r")
    spawn(_ep_grads_worker, (dp_mode, out), WORLD)
    for rank in range(WORLD):
        result = torch.load(f"{out}.{rank}", weights_only=True)
        assert result["local_experts"] == [MOE.num_experts // WORLD], result  # experts really sharded
        assert any(is_expert_param(name) for name in result["errors"])
        assert max(result["errors"].values()) < 1e-5, result
        assert math.isclose(result["norm_ratio"], 1.0, rel_tol=1e-5), result
