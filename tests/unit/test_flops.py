"""FLOPs per token, peaks and MFU: the formula against torch's FlopCounterMode and hand-computed values.

FlopCounterMode counts every matmul torch runs in a forward + backward pass of the debug model; the active-
parameter formula in profiling/flops.py must give the same number. Attention runs on SDPA's math backend so
its score matmuls are visible bmm calls (the CPU flash kernel has no registered FLOP formula), and grouped_mm
gets a formula here (torch registers none). Run: .venv/bin/pytest -q tests/unit/test_flops.py
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from moeyard.job.compose import compose
from moeyard.moe.model import Transformer, init_weights
from moeyard.plan.cluster import detect_kind
from moeyard.profiling import devices
from moeyard.profiling.devices import GPUS, gpu_peak_tflops
from moeyard.profiling.flops import forward_flops_per_token, train_flops_per_token
from moeyard.profiling.profiler import throughput
from tests.helpers import flop_counter


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """[M, K] x [E, K, N] (forward, grad input) or [K, M] x [M, N] -> [E, K, N] (grad weight): 2*M*K*N."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def bmm_flops_without_row_dots(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """[B, M, K] x [B, K, N]: 2*B*M*K*N, except the per-row dot products [N, 1, D] x [N, D, 1] of the combine's
    CPU backward (moe/combine.py: the router weights' gradient, elementwise work that MFU's matmul count
    leaves out, as it does on the paths that compute it as a product and a sum)."""
    if a_shape[1] == 1 and b_shape[2] == 1:
        return 0
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def counted_train_flops(overrides: list[str], batch: int, seq: int) -> tuple[int, dict[str, int]]:
    cfg = compose(["model=debug", *overrides])
    model = Transformer(cfg.model, cfg.moe)
    init_weights(model, 0)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq))
    counter = flop_counter(
        {torch.ops.aten._grouped_mm: grouped_mm_flops, torch.ops.aten.bmm: bmm_flops_without_row_dots}
    )
    with counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens).float().sum().backward()
    by_op = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


@pytest.mark.parametrize("grouped_mm", ["off", "on"])
def test_formula_equals_flop_counter_on_debug_model(grouped_mm: str) -> None:
    batch, seq = 2, 64
    counted, by_op = counted_train_flops([f"moe.grouped_mm={grouped_mm}"], batch, seq)
    cfg = compose(["model=debug"])
    assert counted == train_flops_per_token(cfg.model, cfg.moe, seq) * batch * seq
    assert ("aten._grouped_mm" in by_op) == (grouped_mm == "on")  # the experts really ran that path
    assert by_op["aten.bmm"] > 0  # attention scores are part of the count


@pytest.mark.parametrize("gated", [[], ["moe.shared_expert_hidden=48", "moe.shared_expert_gate=true"]])
def test_formula_equals_flop_counter_with_shared_experts_and_dense_blocks(gated: list[str]) -> None:
    overrides = ["model.first_dense_layers=1", "moe.num_shared_experts=1", "moe.top_k=3", "moe.grouped_mm=off"]
    overrides += gated  # Qwen2-MoE: a shared expert of its own width behind a sigmoid gate
    counted, _ = counted_train_flops(overrides, 2, 32)
    cfg = compose(["model=debug", *overrides])
    assert counted == train_flops_per_token(cfg.model, cfg.moe, 32) * 2 * 32


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_formula_equals_flop_counter_with_latent_attention(q_lora_rank: int) -> None:
    mla = ["model.attention=mla", f"model.q_lora_rank={q_lora_rank}", "model.kv_lora_rank=16"]
    mla += ["model.qk_rope_head_dim=8", "model.qk_nope_head_dim=16", "model.v_head_dim=16", "moe.grouped_mm=off"]
    counted, _ = counted_train_flops(mla, 2, 32)
    cfg = compose(["model=debug", *mla])
    assert counted == train_flops_per_token(cfg.model, cfg.moe, 32) * 2 * 32


def test_debug_model_flops_by_hand() -> None:
    cfg = compose(["model=debug"])  # D=64, H=4, G=2, Hd=16, V=256, E=8, K=2, F=32, 4 MoE blocks
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # wq, wk, wv, wo
    moe = 64 * 8 + 2 * 3 * 64 * 32  # router + 2 active experts
    params = 4 * (attention + moe) + 64 * 256  # + output head
    scores = 4 * 2 * 2 * 64 * 4 * 16  # per block: 2 matmuls of S*H*Hd multiply-adds at S=64
    assert forward_flops_per_token(cfg.model, cfg.moe, 64) == 2 * params + scores == 299_008


def test_gpu_peak_table() -> None:
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4  # H100 SXM data sheet, dense bf16
    assert gpu_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_peak_tflops("NVIDIA H200") == 989.4
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_peak_tflops("NVIDIA GeForce RTX 3090") is None


def test_profiler_and_planner_read_one_device_table() -> None:
    """The MFU's peak of a GPU is the peak the planner plans that GPU with."""
    for name in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"):
        assert GPUS[detect_kind([name])].peak_tflops == gpu_peak_tflops(name)


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cpu_peak.json"
    first = devices.cpu_peak_tflops(cache)
    assert 1e-4 < first < 100  # a real GEMM rate in TFLOP/s
    assert list(json.loads(cache.read_text()).values()) == [first]

    def must_not_measure() -> float:
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(devices, "measure_cpu_tflops", must_not_measure)
    assert devices.cpu_peak_tflops(cache) == first


def test_throughput_and_mfu_by_hand() -> None:
    out = throughput(tokens_per_s=1000.0, world=2, flops_per_token=6e9, peak_tflops=100.0)
    assert out["tokens_per_s_per_device"] == 500.0
    assert math.isclose(out["tflops_per_device"], 3.0)  # 6e9 * 1000 / 2 / 1e12
    assert math.isclose(out["mfu"], 0.03)
    assert "mfu" not in throughput(1000.0, 1, 6e9, None)  # unknown peak: no MFU rather than a wrong one
