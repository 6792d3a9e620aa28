"""Router, capacity, dispatch and balancing-loss formulas on hand-computed cases.

The routers get an identity gate, so the inputs are the logits and every expected number follows from
them by hand. Run: `.venv/bin/pytest -q tests/unit/test_router.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from moeyard.moe.config import MoEConfig
from moeyard.moe.dispatcher import LocalDispatcher
from moeyard.moe.router import (
    Router,
    Routing,
    capacity_keep_mask,
    capacity_per_sequence,
    count_per_expert,
    sequence_aux_loss,
    switch_aux_loss,
    z_loss,
)


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def make_router(num_experts: int, **kw) -> Router:
    """A router whose logits equal its input (identity gate)."""
    kw.setdefault("top_k", 2)
    router = Router(num_experts, MoEConfig(num_experts=num_experts, **kw))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(num_experts))
    return router


def route(router: Router, logits: list) -> Routing:
    """Routes logits given as [S, E] (one sequence) or [G, S, E]."""
    x = torch.tensor(logits, dtype=torch.float32)
    return router(x if x.ndim == 3 else x[None])


def assignments(r: Routing) -> dict[tuple[int, int], float]:
    """{(token, expert): combine weight} of the kept assignments."""
    pairs = zip(*(t.tolist() for t in r.kept()), strict=True)
    return {(t, e): w for t, e, w in pairs}


def assert_assignments(r: Routing, expected: dict[tuple[int, int], float]) -> None:
    got = assignments(r)
    assert sorted(got) == sorted(expected)
    for key, w in expected.items():
        assert got[key] == pytest.approx(w, rel=1e-5), key


# --- token-choice top-k -------------------------------------------------------------------------------


def test_softmax_topk_normalised_and_scaled():
    # logits [1, 3, 2, 0]: experts 1 and 2; normalised weights e^3/(e^3+e^2) = e/(e+1) and 1/(e+1).
    e = math.e
    r = route(make_router(4, router="softmax_topk", norm_topk_prob=True), [[1, 3, 2, 0]])
    assert_assignments(r, {(0, 1): e / (e + 1), (0, 2): 1 / (e + 1)})
    r = route(make_router(4, router="softmax_topk", norm_topk_prob=True, route_scale=2.5), [[1, 3, 2, 0]])
    assert_assignments(r, {(0, 1): 2.5 * e / (e + 1), (0, 2): 2.5 / (e + 1)})


def test_softmax_topk_unnormalised_uses_full_softmax():
    z = math.exp(1) + math.exp(3) + math.exp(2) + 1
    r = route(make_router(4, router="softmax_topk", norm_topk_prob=False), [[1, 3, 2, 0]])
    assert_assignments(r, {(0, 1): math.exp(3) / z, (0, 2): math.exp(2) / z})


def test_sigmoid_topk_normalised_unnormalised_and_scaled():
    # sigmoid([0, 2, -1, 1]) = [.5, .881, .269, .731]: experts 1 and 3.
    s1, s3 = sig(2), sig(1)
    r = route(make_router(4, router="sigmoid_topk", norm_topk_prob=False), [[0, 2, -1, 1]])
    assert_assignments(r, {(0, 1): s1, (0, 3): s3})
    r = route(make_router(4, router="sigmoid_topk", norm_topk_prob=True, route_scale=2.5), [[0, 2, -1, 1]])
    assert_assignments(r, {(0, 1): 2.5 * s1 / (s1 + s3), (0, 3): 2.5 * s3 / (s1 + s3)})


def test_group_limited_routing_picks_only_experts_of_best_groups():
    # 4 groups of 2. Group score = sum of its two sigmoid scores: g0 = s(5)+s(-5) = 1.0, g1 = s(2)+s(1.8)
    # = 1.74, g2 = s(1.7)+s(1.6) = 1.68, g3 < 1. Expert 0 alone is the best, but its group loses.
    logits = [[5, -5, 2, 1.8, 1.7, 1.6, -1, -1]]
    free = route(make_router(8, router="sigmoid_topk", top_k=3, norm_topk_prob=False), logits)
    assert sorted(free.kept()[1].tolist()) == [0, 2, 3]
    limited = make_router(8, router="sigmoid_topk", top_k=3, norm_topk_prob=False, n_groups=4, topk_groups=2)
    r = route(limited, logits)
    assert_assignments(r, {(0, 2): sig(2), (0, 3): sig(1.8), (0, 4): sig(1.7)})


def test_expert_bias_steers_selection_but_not_combine_weights():
    router = make_router(4, router="sigmoid_topk", norm_topk_prob=True)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # choice scores [.5, .881, 1.269, .731]: experts 2 and 1; weights from the unbiased sigmoid scores.
    r = route(router, [[0, 2, -1, 1]])
    s1, s2 = sig(2), sig(-1)
    assert_assignments(r, {(0, 1): s1 / (s1 + s2), (0, 2): s2 / (s1 + s2)})
    assert r.routed_E.tolist() == [0, 1, 1, 0]


def test_update_bias_sign_rule():
    router = make_router(4, bias_update_rate=0.1)
    router.update_bias(torch.tensor([4, 0, 2, 2]))  # mean 2: overloaded expert 0 down, idle expert 1 up
    assert router.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.0, 0.0])
    router.update_bias(torch.tensor([4, 0, 2, 2]))
    assert router.expert_bias.tolist() == pytest.approx([-0.2, 0.2, 0.0, 0.0])


def test_expert_choice_takes_exactly_capacity_tokens_per_sequence():
    # E=2, K=1, cf=1, S=4: C = ceil(1 * 4 * 1 / 2) = 2 tokens per expert per sequence.
    router = make_router(2, router="expert_choice", top_k=1, capacity_factor=1.0, route_scale=2.0)
    seq0 = [[3, 0], [0, 1], [2, 0], [0, 2]]  # p(e0) = sig(3), sig(-1), sig(2), sig(-2)
    seq1 = [[1, 0], [2, 0], [3, 0], [4, 0]]  # every token prefers e0; e1 still takes its best two
    r = route(router, [seq0, seq1])
    expected = {
        (0, 0): sig(3), (2, 0): sig(2), (1, 1): sig(1), (3, 1): sig(2),
        (7, 0): sig(4), (6, 0): sig(3), (4, 1): sig(-1), (5, 1): sig(-2),
    }  # fmt: skip
    assert_assignments(r, {k: 2.0 * w for k, w in expected.items()})
    assert r.routed_E.tolist() == r.kept_E.tolist() == [4, 4]


def test_expert_choice_counts_on_random_input():
    cfg = MoEConfig(num_experts=4, top_k=2, router="expert_choice", capacity_factor=1.5)
    router = Router(8, cfg)
    r = router(torch.randn(3, 10, 8))
    C = math.ceil(1.5 * 10 * 2 / 4)
    token_A, expert_A, _ = r.kept()
    per_seq_expert = torch.zeros(3, 4, dtype=torch.long)
    per_seq_expert.index_put_((token_A // 10, expert_A), torch.ones_like(token_A), accumulate=True)
    assert (per_seq_expert == C).all()
    assert len(set(zip(token_A.tolist(), expert_A.tolist(), strict=True))) == 3 * 4 * C
    assert r.num_kept == 3 * 4 * C  # known from the shapes: no host read needed to size the dispatch


# --- capacity ------------------------------------------------------------------------------------------


def test_capacity_keep_mask_hand_cases():
    expert = torch.tensor([[0, 0, 1, 0, 1], [1, 1, 1, 0, 0]])
    priority = torch.tensor([[3, 1, 0, 2, 4], [0, 1, 2, 3, 4]])
    # Row 0: expert 0 holds slots 0, 1, 3 with priorities 3, 1, 2 -> keeps 1 and 3. Row 1: expert 1 holds
    # slots 0, 1, 2 -> keeps the first two; expert 0 fits.
    keep = capacity_keep_mask(expert, priority, num_experts=2, capacity=2)
    assert keep.tolist() == [[False, True, True, True, True], [True, True, False, True, True]]
    assert capacity_keep_mask(expert, priority, 2, capacity=1).tolist() == [
        [False, True, True, False, False],
        [True, False, False, True, False],
    ]


def test_capacity_per_sequence_formula():
    cfg = MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25)
    assert capacity_per_sequence(cfg, 64) == math.ceil(1.25 * 64 * 2 / 8) == 20
    assert capacity_per_sequence(cfg, 3) == 1


# Tokens 0-2 prefer expert 0 with sig(1), sig(3), sig(2); token 3 prefers expert 1. With S=4, K=1, E=2 and
# capacity_factor 0.5, each expert has ceil(0.5 * 4 / 2) = 1 slot per sequence.
SWITCH_LOGITS = [[1, 0], [3, 0], [2, 0], [0, 1]]


def switch_router(**kw) -> Router:
    return make_router(2, router="softmax_topk", top_k=1, norm_topk_prob=False, **kw)


def test_probability_policy_drops_lowest_weight():
    r = route(switch_router(capacity_factor=0.5, drop_policy="probability"), SWITCH_LOGITS)
    assert_assignments(r, {(1, 0): sig(3), (3, 1): sig(1)})
    assert r.routed_E.tolist() == [3, 1] and r.kept_E.tolist() == [1, 1]


def test_position_policy_drops_latest_tokens():
    r = route(switch_router(capacity_factor=0.5, drop_policy="position"), SWITCH_LOGITS)
    assert_assignments(r, {(0, 0): sig(1), (3, 1): sig(1)})


def test_dropless_when_capacity_factor_is_null():
    r = route(switch_router(capacity_factor=None), SWITCH_LOGITS)
    assert_assignments(r, {(0, 0): sig(1), (1, 0): sig(3), (2, 0): sig(2), (3, 1): sig(1)})
    assert r.kept_E.tolist() == r.routed_E.tolist() == [3, 1]


def test_position_policy_serves_first_choices_before_second_choices():
    # E=3, K=2, S=3, cf=0.5: one slot per expert. First choices: t0->e0, t1->e1, t2->e1; second choices:
    # t0->e1, t1->e0, t2->e2. Expert 1 keeps t1's first choice, dropping t2's first choice (later token)
    # and t0's second choice (earlier token, but a second choice).
    router = make_router(3, router="softmax_topk", top_k=2, capacity_factor=0.5, drop_policy="position")
    r = route(router, [[3, 2, 0], [2, 3, 0], [0, 3, 2]])
    assert sorted(assignments(r)) == [(0, 0), (1, 1), (2, 2)]
    assert r.routed_E.tolist() == [2, 3, 1] and r.kept_E.tolist() == [1, 1, 1]


@pytest.mark.parametrize("policy", ["probability", "position"])
def test_capacity_is_counted_per_sequence(policy):
    """Routing 4 sequences at once or in two halves drops exactly the same assignments."""
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, capacity_factor=0.75, drop_policy=policy)
    router = Router(8, cfg)
    x = torch.randn(4, 12, 8)
    whole = assignments(router(x))
    halves = {**assignments(router(x[:2]))}
    halves.update({(t + 24, e): w for (t, e), w in assignments(router(x[2:])).items()})
    assert len(whole) < 4 * 12 * 2  # some assignments were dropped
    assert sorted(whole) == sorted(halves)
    assert all(whole[k] == halves[k] for k in whole)


# --- dispatch ------------------------------------------------------------------------------------------


def hand_routing(token, expert, weight, num_experts=3) -> Routing:
    zero = torch.zeros(())
    kept_E = count_per_expert(torch.tensor(expert), num_experts)
    return Routing(
        token_idx_A=torch.tensor(token), expert_idx_A=torch.tensor(expert), weight_A=torch.as_tensor(weight),
        num_kept=None, routed_E=zero, kept_E=kept_E, mean_prob_E=zero, entropy=zero,
        aux_loss=zero, seq_aux_loss=zero, z_loss=zero,
    )  # fmt: skip


def test_local_dispatcher_round_trip():
    x_TD = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # The fifth assignment was dropped by capacity (expert id E = 3): it reaches no expert.
    routing = hand_routing([0, 0, 1, 2, 1], [2, 0, 2, 1, 3], [0.5, 0.25, 1.0, 2.0, 9.0])
    d = LocalDispatcher(num_experts=3)
    seen = {}

    def experts(x_ND, counts_E):
        seen.update(x=x_ND.tolist(), counts=counts_E.tolist())
        return torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])

    out = d.run(x_TD, routing, experts, alongside=lambda: torch.ones(1))
    # Expert order: (t0, e0), (t2, e1), (t0, e2), (t1, e2).
    assert seen == {"x": [[1, 0], [1, 1], [1, 0], [0, 1]], "counts": [1, 1, 2]}
    # t0 = 0.25 * [1, 2] + 0.5 * [5, 6]; t1 = 1.0 * [7, 8]; t2 = 2.0 * [3, 4].
    assert out.out_TD.tolist() == [[2.75, 3.5], [7.0, 8.0], [6.0, 8.0]]
    assert out.received_E.tolist() == [1, 1, 2] and out.alongside.tolist() == [1.0]
    # Identity experts give back each token times the sum of its kept weights.
    identity = d.run(x_TD, routing, lambda x_ND, counts_E: x_ND, alongside=None)
    assert identity.out_TD.tolist() == [[0.75, 0.0], [0.0, 1.0], [2.0, 2.0]] and identity.alongside is None


def test_local_dispatcher_gradients_reach_tokens_and_kept_weights():
    # K = 2 per token, token-major: t0 -> (e2, e0), t1 -> (e2, dropped), t2 -> (e1, e0).
    x_TD = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    weight = torch.tensor([0.5, 0.25, 1.0, 9.0, 2.0, 3.0], requires_grad=True)
    routing = hand_routing([0, 0, 1, 1, 2, 2], [2, 0, 2, 3, 1, 0], weight)
    scale = torch.tensor([[1.0], [10.0], [100.0], [1000.0], [1e4]])  # tells the rows apart
    out = LocalDispatcher(num_experts=3).run(x_TD, routing, lambda x_ND, counts_E: x_ND * scale[: len(x_ND)], None)
    # Expert order: (t0, e0) x1, (t2, e0) x10, (t2, e1) x100, (t0, e2) x1000, (t1, e2) x1e4.
    want = [[0.25 * 1 + 0.5 * 1000, 0.0], [0.0, 1.0 * 1e4], [3.0 * 10 + 2.0 * 100] * 2]
    assert out.out_TD.tolist() == want and out.received_E.tolist() == [2, 1, 2]
    out.out_TD.sum().backward()
    assert x_TD.grad.tolist() == [[500.25] * 2, [1e4] * 2, [230.0] * 2]
    assert weight.grad.tolist() == [1000.0, 1.0, 1e4, 0.0, 200.0, 20.0]  # the dropped one: no gradient


# --- balancing losses ----------------------------------------------------------------------------------


def test_switch_aux_loss_formula():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # f = [3, 1] / 4, P = [0.55, 0.45]: 2 * (0.75 * 0.55 + 0.25 * 0.45) = 1.05.
    assert switch_aux_loss(probs, torch.tensor([3, 1])).item() == pytest.approx(1.05)
    # Perfect balance gives 1 whatever E.
    assert switch_aux_loss(torch.full((6, 3), 1 / 3), torch.tensor([4, 4, 4])).item() == pytest.approx(1.0)


def test_sequence_aux_loss_formula():
    probs = torch.tensor([[[0.7, 0.3], [0.4, 0.6]], [[0.9, 0.1], [0.8, 0.2]]])
    topk = torch.tensor([[[0], [1]], [[0], [0]]])
    # Seq 0: f = [1, 1] * 2 / 2, P = [.55, .45] -> 1.0. Seq 1: f = [2, 0], P = [.85, .15] -> 1.7. Mean 1.35.
    assert sequence_aux_loss(probs, topk).item() == pytest.approx(1.35)
    # Scores are normalised per token first (sigmoid scores do not sum to one).
    assert sequence_aux_loss(probs * torch.tensor([[[2.0], [3.0]], [[0.5], [4.0]]]), topk).item() == pytest.approx(1.35)


def test_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    # logsumexp = ln 2 and ln 4: mean of (ln 2)^2 and (2 ln 2)^2 = 2.5 (ln 2)^2.
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2)


def test_router_reports_the_formulas_of_its_own_decisions():
    ln3 = math.log(3)
    r = route(make_router(2, router="softmax_topk", top_k=1), [[ln3, 0.0], [0.0, ln3], [ln3, 0.0]])
    p0 = [0.75, 0.25, 0.75]  # softmax probability of expert 0 per token
    # routed = [2, 1]; P = [1.75, 1.25] / 3: aux = 2 * (2/3 * 1.75/3 + 1/3 * 1.25/3).
    assert r.routed_E.tolist() == [2, 1]
    assert r.aux_loss.item() == pytest.approx(2 * (2 / 3 * 1.75 / 3 + 1 / 3 * 1.25 / 3))
    assert r.mean_prob_E.tolist() == pytest.approx([1.75 / 3, 1.25 / 3])
    ent = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in p0]
    assert r.entropy.item() == pytest.approx(sum(ent) / 3)
    assert r.z_loss.item() == pytest.approx(math.log(4) ** 2)
    # One sequence, K=1, S=3: f = [2, 1] * 2 / 3, P = [1.75, 1.25] / 3.
    assert r.seq_aux_loss.item() == pytest.approx((4 / 3 * 1.75 + 2 / 3 * 1.25) / 3)


def test_router_math_stays_fp32_under_autocast():
    torch.manual_seed(0)
    router = Router(16, MoEConfig(num_experts=8, top_k=2))
    x = torch.randn(2, 8, 16).bfloat16()
    plain = router(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x.float(), router.gate.weight).dtype == torch.bfloat16  # autocast on
        auto = router(x)
    # Same bf16 inputs, so fp32 router math gives bitwise the same logits, choices and weights.
    assert torch.equal(auto.expert_idx_A, plain.expert_idx_A) and auto.num_kept == plain.num_kept == 2 * 8 * 2
    assert torch.equal(auto.weight_A, plain.weight_A) and torch.equal(auto.z_loss, plain.z_loss)
