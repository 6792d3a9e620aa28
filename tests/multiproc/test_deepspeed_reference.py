"""DeepSpeed's MoE layer as an outside reference: given the same weights, it and ours agree.

`deepspeed.moe.layer.MoE` (GShard-style gating, einsum-free sparse dispatch) gets an expert module computing
the same SwiGLU as ours, and our weights copied in. Routing is top-1 and top-2 without drops
(drop_tokens=False, no random token selection, no Gumbel sampling of the second expert, no noisy gate), which
in our terms is dropless softmax top-k with `norm_topk_prob` = (k == 2): DeepSpeed renormalises the two top-2
weights and uses the raw softmax probability for top-1. Both sides run forward and backward of sum(out * g).

Checked against one single-process MoELayer over all tokens: outputs, input gradients, gate gradients
(summed over ranks), expert gradients, per-expert routed counts and, for top-1, the Switch aux loss
(DeepSpeed's top-2 aux loss counts first choices only, ours counts both, so top-2 aux values differ by
definition). ep_size=1 runs one gloo rank; ep_size=2 runs two, where our AllToAllDispatcher layer is checked
against the same reference. Each case runs in spawned processes with a timeout. The first run JIT-compiles
DeepSpeed's small comm op (about 25-40 s) into TORCH_EXTENSIONS_DIR (default: <repo>/.cache/torch_extensions).

Run: .venv/bin/pytest -q tests/multiproc/test_deepspeed_reference.py
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from moeyard.moe.config import MoEConfig
from moeyard.moe.experts import GroupedExperts
from moeyard.moe.layer import MoELayer, SwiGLU
from tests.helpers import spawn

REPO = Path(__file__).resolve().parents[2]
D, F, E, B, S = 32, 48, 8, 2, 16
"""Model dim, expert hidden, experts, sequences and tokens per sequence on each rank."""
TOP_KS = (1, 2)
SPAWN_TIMEOUT_S = 240


def reference_layer(k: int) -> MoELayer:
    """Our layer with seeded weights; balancing losses off so gradients come from the output alone."""
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=F, norm_topk_prob=k == 2, aux_loss_coef=0.0, z_loss_coef=0.0)
    layer = MoELayer(D, cfg)
    gen = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.randn(E, D, generator=gen) / D**0.5)
        for w in (layer.experts.w1, layer.experts.w3, layer.experts.w2):
            w.copy_(torch.randn(w.shape, generator=gen) * 0.2)
    return layer


def inputs(k: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens x and output cotangent g, both [world, B, S, D]; rank r takes row r."""
    gen = torch.Generator().manual_seed(200 + k)
    return torch.randn(world, B, S, D, generator=gen), torch.randn(world, B, S, D, generator=gen)


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Runs sum(out * g) backward; returns (out, x.grad, DeepSpeed's (l_aux, exp_counts) or None)."""
    x = x.clone().requires_grad_(True)
    result = layer(x)
    out, extra = (result[0], result[1:]) if isinstance(result, tuple) else (result, None)
    (out * g).sum().backward()
    return out.detach(), x.grad, extra


def deepspeed_layer(ours: MoELayer, k: int, ep_size: int, rank: int) -> torch.nn.Module:
    """deepspeed.moe.layer.MoE holding `ours`' gate and this rank's block of experts."""
    from deepspeed.moe.layer import MoE

    ds = MoE(
        D,
        SwiGLU(D, F),
        num_experts=E,
        ep_size=ep_size,
        k=k,
        min_capacity=0,
        drop_tokens=False,
        use_rts=False,
        noisy_gate_policy=None,
        top2_2nd_expert_sampling=False,
    )
    ds.set_deepspeed_parallelism()
    local = E // ep_size
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.gate.weight)
        for j, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            e = rank * local + j
            # nn.Linear stores [out, in]; our stacked weights are [in, out] per expert.
            for name in ("w1", "w3", "w2"):
                getattr(expert, name).weight.copy_(getattr(ours.experts, name)[e].T)
    return ds


def deepspeed_grads(ds: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gate and stacked local-expert gradients of a DeepSpeed layer, in our [El, in, out] layout."""
    experts = ds.deepspeed_moe.experts.deepspeed_experts
    grads = {"gate": ds.deepspeed_moe.gate.wg.weight.grad}
    for name in ("w1", "w3", "w2"):
        grads[name] = torch.stack([getattr(x, name).weight.grad.T for x in experts])
    return grads


def ours_ep_layer(ours: MoELayer, rank: int, world: int) -> MoELayer:
    """`ours` with this rank's experts and the all-to-all dispatcher over the whole world."""
    import torch.distributed as dist

    from moeyard.parallel.expert import AllToAllDispatcher

    layer = copy.deepcopy(ours)
    local = E // world
    layer.experts = GroupedExperts(local, D, F, ours.cfg.grouped_mm)
    with torch.no_grad():
        for name in ("w1", "w3", "w2"):
            getattr(layer.experts, name).copy_(getattr(ours.experts, name)[rank * local : (rank + 1) * local])
    layer.dispatcher = AllToAllDispatcher(E, dist.group.WORLD, None)
    return layer


def _worker(rank: int, world: int, out_dir: str) -> None:
    import deepspeed
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    result = {}
    for k in TOP_KS:
        ours = reference_layer(k)
        x, g = (t[rank] for t in inputs(k, world))
        ds = deepspeed_layer(ours, k, world, rank)
        out, x_grad, (l_aux, exp_counts) = fwd_bwd(ds, x, g)
        result[k] = {
            "ds": {
                "out": out,
                "x_grad": x_grad,
                "l_aux": l_aux.detach(),
                "counts": exp_counts,
                **deepspeed_grads(ds),
            }
        }
        if world > 1:
            ep = ours_ep_layer(ours, rank, world)
            out, x_grad, _ = fwd_bwd(ep, x, g)
            grads = {name: getattr(ep.experts, name).grad for name in ("w1", "w3", "w2")}
            result[k]["ours_ep"] = {"out": out, "x_grad": x_grad, "gate": ep.router.gate.weight.grad, **grads}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _spawn(world: int, out_dir: Path) -> list[dict]:
    """Runs `_worker` on `world` gloo ranks, killing them all if they outlive SPAWN_TIMEOUT_S."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    os.environ.setdefault("DS_BUILD_OPS", "0")
    spawn(_worker, (world, str(out_dir)), world, timeout_s=SPAWN_TIMEOUT_S, what="DeepSpeed reference")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict]]:
    """Per-rank results for ep_size 1 and 2, each spawned once for both top-k values."""
    return {world: _spawn(world, tmp_path_factory.mktemp(f"ep{world}")) for world in (1, 2)}


def single_process(k: int, world: int) -> dict[str, torch.Tensor]:
    """Our single-process layer (local dispatcher, all experts) over every rank's tokens."""
    layer = reference_layer(k)
    x, g = inputs(k, world)
    out, x_grad, _ = fwd_bwd(layer, x.flatten(0, 1), g.flatten(0, 1))
    stats = layer.drain_stats()[0]
    grads = {name: getattr(layer.experts, name).grad for name in ("w1", "w3", "w2")}
    per_rank = {"out": out.view(world, B, S, D), "x_grad": x_grad.view(world, B, S, D)}
    return {
        **per_rank,
        **grads,
        "gate": layer.router.gate.weight.grad,
        "aux": stats["aux_loss"],
        "routed": stats["routed"],
    }


def assert_matches(ref: dict[str, torch.Tensor], per_rank: list[dict[str, torch.Tensor]]) -> None:
    """Per-rank outputs/input grads are ref rows; gate grads sum over ranks; expert grads are ref blocks."""

    # fp32 tolerance: sums over ranks reassociate, e.g. gate gradients of size ~5 differ by ~1.5e-6.
    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")

    for r, got in enumerate(per_rank):
        close(got["out"], ref["out"][r], f"output of rank {r}")
        close(got["x_grad"], ref["x_grad"][r], f"input gradient of rank {r}")
    close(sum(got["gate"] for got in per_rank), ref["gate"], "gate gradient")
    for name in ("w1", "w3", "w2"):
        close(torch.cat([got[name] for got in per_rank]), ref[name], f"expert {name} gradient")


@pytest.mark.multiproc
@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S + 60)
@pytest.mark.parametrize("ep_size", [1, 2])
@pytest.mark.parametrize("k", TOP_KS)
def test_deepspeed_moe_matches_ours(runs: dict[int, list[dict]], k: int, ep_size: int) -> None:
    ref = single_process(k, ep_size)
    assert (ref["routed"] > 0).all(), "every expert must get tokens, so every expert gradient is checked"
    ds = [rank[k]["ds"] for rank in runs[ep_size]]
    assert_matches(ref, ds)
    # DeepSpeed's exp_counts are this rank's (token, expert) choices; summed they are our routed counts.
    torch.testing.assert_close(sum(r["counts"] for r in ds), ref["routed"])
    if k == 1 and ep_size == 1:
        # Top-1: both compute E * sum_e f_e * P_e over the same tokens.
        torch.testing.assert_close(ds[0]["l_aux"], ref["aux"], rtol=1e-6, atol=1e-7)


@pytest.mark.multiproc
@pytest.mark.timeout(2 * SPAWN_TIMEOUT_S + 60)
@pytest.mark.parametrize("k", TOP_KS)
def test_our_all_to_all_layer_matches_single_process(runs: dict[int, list[dict]], k: int) -> None:
    assert_matches(single_process(k, 2), [rank[k]["ours_ep"] for rank in runs[2]])
