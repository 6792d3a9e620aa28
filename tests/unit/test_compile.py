"""torch.compile captures the bf16 MoE block whole, with and without activation checkpointing.

The blocks are compiled as training compiles them (`parallel.parallelize.apply_ac`, then `apply_compile`) and
run under bf16 autocast on CPU over several micro-batches and two optimizer steps. torch._dynamo's counters
then show at least one captured graph, no graph break (a break inside a checkpointed block would leave it
uncompiled) and no recompile per micro-batch (the graph count stays at one per distinct block). The losses
equal eager ones within bf16 rounding, and each MoE layer records one set of routing statistics per
micro-batch (none from the recompute). The fp32 per-expert loop (the path where grouped_mm has no fused kernel)
is captured whole too: its host read of the counts becomes symbolic sizes, not a graph break.

    .venv/bin/pytest -q tests/unit/test_compile.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.model import Transformer, init_weights
from moeyard.parallel.parallelize import apply_ac, apply_compile

MODEL = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=16)
MOE = MoEConfig(num_experts=4, top_k=2, expert_hidden=16)  # dropless: the kept count is known from shapes
STEPS, MICRO = 2, 2
BF16_ULP = 2.0**-8
"""bf16 keeps 8 significant bits: one rounding moves a value by at most half of this, relatively."""
FP32_LOSS_RTOL = 1e-5
"""fp32 keeps 24 significant bits (one rounding: 6e-8 relative). Compiled code sums in another order than
eager; over a few hundred roundings between the inputs and the loss the two agree to well under 100 of
them. A wrong computation (a lost expert, a token in the wrong expert's slice) moves the loss by far more."""
LOSS_RTOL = 4 * BF16_ULP
"""Compiled code may fuse ops and skip roundings that eager makes to bf16 (or round where eager did not).
The loss is a mean log-probability built in fp32 from bf16 logits, and cross-entropy moves by at most twice
the largest logit change; each logit carries the last few roundings of the residual stream through the two
blocks, so the losses agree to a few bf16 roundings: 4 ulps relative (about 1.6%). A wrong computation
(a lost expert, a missing aux term, a skipped block) moves them by far more."""


def _train(
    ac: str, compiled: bool, moe: MoEConfig = MOE, dtype: torch.dtype = torch.bfloat16
) -> tuple[list[float], list[int]]:
    """Losses of every micro-batch and the routing-statistics count per MoE layer (`dtype`: autocast's;
    fp32 runs without autocast)."""
    torch.manual_seed(0)
    model = Transformer(MODEL, moe)
    init_weights(model, seed=0)
    apply_ac(model, ac, every=1)
    if compiled:
        apply_compile(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    tokens = torch.randint(0, MODEL.vocab_size, (STEPS, MICRO, 2, MODEL.max_seq_len + 1))
    losses = []
    for step in range(STEPS):
        for x in tokens[step]:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
            loss.backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
    return losses, [len(moe.drain_stats()) for moe in model.moe_layers().values()]


@pytest.fixture(scope="module")
def eager() -> list[float]:
    losses, stats = _train("none", compiled=False)
    assert stats == [STEPS * MICRO] * MODEL.n_layers
    return losses


@pytest.mark.parametrize("ac", ["none", "full"])
def test_compiled_blocks_capture_whole_graphs(ac: str, eager: list[float]) -> None:
    torch._dynamo.reset()
    counters.clear()
    losses, stats = _train(ac, compiled=True)
    # Both blocks have the same structure: they share one graph. A recompile per micro-batch would add one
    # graph per forward; a graph break would show in graph_break (and, under the checkpoint, no graph).
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert dict(counters["graph_break"]) == {}
    assert stats == [STEPS * MICRO] * MODEL.n_layers  # one per forward, none from the recompute
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("ac", ["none", "full"])
def test_fp32_expert_loop_compiles_without_a_break(ac: str) -> None:
    """The per-expert loop reads the counts on the host once per layer: under compile they become symbolic
    sizes (`apply_compile` turns on capture_scalar_outputs for the loop) instead of a break that splits the
    block, or leaves it uncompiled under the checkpoint."""
    loop = replace(MOE, grouped_mm="off")
    eager, _ = _train("none", compiled=False, moe=loop, dtype=torch.float32)
    torch._dynamo.reset()
    counters.clear()
    # The flag is process-wide (a run's process ends with it): restored after the test, so others see the default.
    with torch._dynamo.config.patch(capture_scalar_outputs=False):
        losses, stats = _train(ac, compiled=True, moe=loop, dtype=torch.float32)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert dict(counters["graph_break"]) == {}
    assert stats == [STEPS * MICRO] * MODEL.n_layers
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=FP32_LOSS_RTOL, atol=0)
