"""`moe.balance_scope`: which tokens the Switch balancing loss's statistics cover (moe/balance.py).

- global_batch equals Megatron-Core's `global_aux_loss` (its running buffer of counts, reimplemented from
  megatron-core 0.16's router.py `_apply_global_aux_loss`, fed to its own `switch_load_balancing_loss_func`)
  over 4 micro-batches on one rank, where the two definitions coincide (fp32, value and gradient).
- It differs from the micro-batch loss where it must: four micro-batches each routed to their own two of
  eight experts make a perfectly balanced step, so the last micro-batch's global-batch loss is exactly 1
  with no gradient, while its micro-batch loss is ~E/2 (regression for modelscope/ms-swift#6787, whose
  global-batch loss silently became a micro-batch loss). With one micro-batch the two are the same.
- Its gradient is not 1/dp too small (NVIDIA/Megatron-LM#3672, fixed by #3769): two data-parallel ranks
  emulated in one process, each with its half of every micro-batch, give one process's value and gradient.
- Activation checkpointing (pytorch/torchtitan PR #4772): a recompute replays its forward's counts without
  counting them again, whether backwards follow each forward (gradient accumulation) or come after all
  forwards (a pipeline schedule): gradients equal those of the uncheckpointed layer. A backward out of
  micro-batch order is caught on the device, not trained on another micro-batch's counts.
- sequence is DeepSeek-V3's sequence-wise loss; the config rejects unknown scopes and global_batch with
  compile in one line.

Run: .venv/bin/pytest -q tests/unit/test_balance_scope.py
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moeyard.job.compose import compose
from moeyard.job.layout import check_layout
from moeyard.moe.config import MoEConfig
from moeyard.moe.layer import MoELayer
from moeyard.moe.router import Router, count_per_expert
from moeyard.parallel.dims import ParallelDims

TOL = 1e-6
"""fp32 tolerance on O(1) losses and their gradients (sums of a few dozen terms)."""
E, K, M = 8, 2, 4
"""Experts, experts per token, micro-batches per step."""


@pytest.fixture(scope="module")
def mcore():
    """megatron.core.transformer.moe.moe_utils, or a skip; its import warns about absent TE/apex."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.transformer.moe.moe_utils")


def identity_router(scope: str, router: str = "softmax_topk") -> Router:
    """A Router whose logits are its input [G, S, E] (an identity gate)."""
    r = Router(E, MoEConfig(num_experts=E, top_k=K, router=router, balance_scope=scope))
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E))
    return r


def seeded(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def aux_losses(router: Router, logits_MGSE: torch.Tensor, reduce_load=None) -> list[torch.Tensor]:
    """The router's aux loss of each micro-batch of one step, in order."""
    return [router(logits_GSE, reduce_load=reduce_load).aux_loss for logits_GSE in logits_MGSE]


@pytest.mark.parametrize("router", ["softmax_topk", "sigmoid_topk"])
def test_global_batch_matches_megatron_global_aux_loss(mcore, router):
    G, S = 2, 8
    logits_MGSE = seeded(M, G, S, E, seed=1)
    ours = aux_losses(identity_router("global_batch", router), logits_MGSE)
    score_function = "sigmoid" if router == "sigmoid_topk" else "softmax"
    global_tokens_per_expert = torch.zeros(E)  # TopKRouter's buffers, one tp/dp/cp rank
    for m, ga_steps in enumerate(range(1, M + 1)):
        map_TE, scores_TE = mcore.compute_routing_scores_for_aux_loss(logits_MGSE[m].view(G * S, E), K, score_function)
        global_tokens_per_expert += map_TE.sum(0)
        averaged = global_tokens_per_expert / ga_steps
        theirs = mcore.switch_load_balancing_loss_func(scores_TE, averaged, G * S, K, E, 1.0)
        torch.testing.assert_close(ours[m], theirs, rtol=0, atol=TOL)
        (ours_grad,) = torch.autograd.grad(ours[m], logits_MGSE, retain_graph=True)
        (theirs_grad,) = torch.autograd.grad(theirs, logits_MGSE, retain_graph=True)
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=TOL)


def one_pair_per_micro_batch() -> torch.Tensor:
    """Logits [M, G, S, E] sending every token of micro-batch m to experts 2m and 2m + 1 (by a margin of 4)."""
    logits_MGSE = 0.1 * torch.randn(M, 2, 8, E, generator=torch.Generator().manual_seed(2))
    for m in range(M):
        logits_MGSE[m, ..., 2 * m : 2 * m + 2] += 4.0
    return logits_MGSE.requires_grad_(True)


def test_global_batch_differs_from_micro_batch_where_it_must():
    logits_MGSE = one_pair_per_micro_batch()
    micro = aux_losses(identity_router("micro_batch"), logits_MGSE)
    step = aux_losses(identity_router("global_batch"), logits_MGSE)
    # Micro-batch 0 has seen only itself: the same loss and gradient.
    torch.testing.assert_close(step[0], micro[0], rtol=0, atol=TOL)
    grads = [torch.autograd.grad(loss, logits_MGSE, retain_graph=True)[0] for loss in (step[0], micro[0])]
    torch.testing.assert_close(*grads, rtol=0, atol=TOL)
    # Each micro-batch alone is as unbalanced as it gets (E * sum_e f_e P_e ~ E/K); the step so far grows
    # more balanced, and the whole step is perfect: f_e = 1/E, so the loss is sum_e P_e = 1 (softmax).
    for m in range(1, M):
        got, alone, before = float(step[m].detach()), float(micro[m].detach()), float(step[m - 1].detach())
        assert alone > 0.9 * E / K and got < before, (m, alone, got)
    torch.testing.assert_close(step[-1], torch.tensor(1.0), rtol=0, atol=TOL)
    (last_grad,) = torch.autograd.grad(step[-1], logits_MGSE, retain_graph=True)
    (micro_grad,) = torch.autograd.grad(micro[-1], logits_MGSE)
    assert last_grad.abs().max() < TOL < micro_grad.abs().max()


def test_gradient_is_not_scaled_by_the_data_parallel_degree():
    """Two dp ranks, each with half the sequences of every micro-batch: the trainer averages their losses'
    gradients. Each rank's P_e is the mean over its own tokens, so the average is one process's loss."""
    logits_MGSE = seeded(2, 4, 8, E, seed=3)
    whole = aux_losses(identity_router("global_batch"), logits_MGSE)
    halves = logits_MGSE.chunk(2, dim=1)

    def counts(logits_GSE: torch.Tensor) -> torch.Tensor:
        return count_per_expert(logits_GSE.detach().topk(K, dim=-1).indices, E)

    per_rank = []
    for rank in range(2):
        other = halves[1 - rank]
        router = identity_router("global_batch")
        # reduce_load: the all-reduce over the dp pair, the other rank's counts of the same micro-batch added
        per_rank.append(
            [router(halves[rank][m], reduce_load=lambda c, m=m, o=other: c + counts(o[m])).aux_loss for m in range(2)]
        )
    for m in range(2):
        dp_mean = (per_rank[0][m] + per_rank[1][m]) / 2
        torch.testing.assert_close(dp_mean, whole[m], rtol=0, atol=TOL)
        (dp_grad,) = torch.autograd.grad(dp_mean, logits_MGSE, retain_graph=True)
        (one_grad,) = torch.autograd.grad(whole[m], logits_MGSE, retain_graph=True)
        torch.testing.assert_close(dp_grad, one_grad, rtol=0, atol=TOL)


def moe_layer(scope: str) -> MoELayer:
    cfg = MoEConfig(num_experts=E, top_k=K, expert_hidden=8, aux_loss_coef=1.0, z_loss_coef=0.0, balance_scope=scope)
    torch.manual_seed(4)
    layer = MoELayer(16, cfg)
    with torch.no_grad():  # the experts' weights are allocated, not initialised
        for param in layer.parameters():
            param.normal_(std=0.3)
    return layer


def grads_after_step(layer: MoELayer, x_M: list[torch.Tensor], ac: bool, order: str) -> dict[str, torch.Tensor]:
    """One step of M micro-batches: each forward then its backward ("interleaved", gradient accumulation), or
    all forwards then the backwards in micro-batch order ("pipelined"); `ac`: each forward checkpointed."""
    layer.zero_grad()

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = checkpoint(layer, x, use_reentrant=False) if ac else layer(x)
        return out.square().mean()

    if order == "interleaved":
        for x in x_M:
            forward(x).backward()
    else:
        for loss in [forward(x) for x in x_M]:
            loss.backward()
    if layer.cfg.balance_scope == "global_batch":
        assert len(layer.router.step_load.running_E) == len(x_M), "a recompute counted its micro-batch again"
        assert layer.router.step_load.replayed == (len(x_M) if ac else 0)
    layer.drain_stats()
    return {name: p.grad.clone() for name, p in layer.named_parameters()}


@pytest.mark.parametrize("order", ["interleaved", "pipelined"])
def test_recompute_replays_its_forwards_counts(order):
    x_M = [torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(10 + m)) for m in range(3)]
    layer = moe_layer("global_batch")
    plain = grads_after_step(layer, x_M, ac=False, order=order)
    recomputed = grads_after_step(layer, x_M, ac=True, order=order)
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=0, atol=TOL, msg=name)
    # The gate's gradient carries the balancing term; the micro-batch loss gives another one.
    micro = grads_after_step(moe_layer("micro_batch"), x_M, ac=False, order=order)
    gate = "router.gate.weight"
    assert not torch.allclose(micro[gate], plain[gate], rtol=0, atol=100 * TOL)


def test_backward_out_of_micro_batch_order_is_caught():
    layer = moe_layer("global_batch")
    x_M = [torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(20 + m)) for m in range(2)]
    losses = [checkpoint(layer, x, use_reentrant=False).square().mean() for x in x_M]
    running = layer.router.step_load.running_E
    assert not torch.equal(running[0], running[1] - running[0]), "the two micro-batches route alike"
    with pytest.raises(RuntimeError, match="recompute routed other tokens"):
        losses[1].backward()


def test_the_next_step_counts_from_zero():
    logits_MGSE = one_pair_per_micro_batch()
    router = identity_router("global_batch")
    layer = MoELayer(E, router.cfg)
    layer.router = router
    first = aux_losses(router, logits_MGSE)
    layer.drain_stats()  # the trainer's end of a step
    again = aux_losses(router, logits_MGSE)
    torch.testing.assert_close(torch.stack(again), torch.stack(first), rtol=0, atol=0)


def test_no_gradient_forward_keeps_to_its_micro_batch():
    """Evaluation and generation train nothing: they neither read nor grow the step's counts."""
    logits_MGSE = one_pair_per_micro_batch().detach()
    router = identity_router("global_batch")
    with torch.no_grad():
        step = aux_losses(router, logits_MGSE)
    micro = aux_losses(identity_router("micro_batch"), logits_MGSE)
    torch.testing.assert_close(torch.stack(step), torch.stack(micro), rtol=0, atol=0)
    assert router.step_load.running_E == []


def test_sequence_scope_is_the_sequence_loss():
    routing = identity_router("sequence")(seeded(3, 8, E, seed=5))
    assert torch.equal(routing.aux_loss, routing.seq_aux_loss)


def test_config_rejects_an_unknown_scope():
    with pytest.raises(ValueError, match=r"^moe.balance_scope=global must be one of"):
        MoEConfig(balance_scope="global").check()


def test_global_batch_with_compile_is_refused():
    cfg = compose(["model=debug", "moe.balance_scope=global_batch", "parallel.compile=true"])
    with pytest.raises(ValueError, match=r"^moe.balance_scope=global_batch is not supported with parallel.compile"):
        check_layout(cfg, ParallelDims.from_config(cfg.parallel, 1))
