"""Model FLOPs per token from the active parameters, the peak they are measured against, and peak memory.

Forward FLOPs per token, counting a multiply-add as 2 FLOPs and only matrix multiplies (norms, softmax, RoPE
and the embedding lookup are left out, as in the PaLM and Megatron MFU conventions):

    attention, per block   2 * D * (H + 2 * G) * Hd + 2 * H * Hd * D     projections wq, wk, wv, wo
                         + 2 * 2 * S * H * Hd                            scores Q K^T and P V, full S x S
    dense FFN block        2 * 3 * D * F_dense                           SwiGLU w1, w3, w2
    MoE block              2 * D * E                                     router
                         + 2 * 3 * D * F * (K + n_shared)                K routed experts + shared experts
    output head            2 * D * V

with D model dim, H query heads, G kv heads, Hd head dim, S sequence length, E experts, K = top_k, F expert
hidden, V vocab. Training FLOPs per token = 3 x forward (the backward pass computes input and weight
gradients, two matmuls per forward matmul). Only the K chosen experts count: that is what "active" means.
Expert-choice routing fills K * T / E slots per expert, the same K per token on average; dropped tokens and
activation-checkpoint recompute are not subtracted or added (model FLOPs, not hardware FLOPs). The scores term
counts the whole S x S matrix, as torch's FlopCounterMode and the PaLM paper do, although causal kernels skip
about half of it.
"""

from __future__ import annotations

import resource

import torch

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.profiling.devices import cpu_peak_tflops, gpu_peak_tflops


def attention_flops_per_token(model: ModelConfig, seq_len: int) -> tuple[int, int]:
    """(projection FLOPs, score FLOPs) of one attention block, forward, per token."""
    d, h, g, hd = model.dim, model.n_heads, model.n_kv_heads, model.head_dim
    if model.attention == "mla":
        return _mla_projection_flops(model), 2 * seq_len * h * (hd + model.v_head_dim)
    projections = 2 * d * (h + 2 * g) * hd + 2 * h * hd * d
    scores = 2 * 2 * seq_len * h * hd
    return projections, scores


def _mla_projection_flops(model: ModelConfig) -> int:
    """Multi-head latent attention: query (through its low-rank bottleneck when q_lora_rank > 0), the joint
    key/value down-projection with the shared rotary key, the per-head up-projection, the output."""
    d, h, qk, q = model.dim, model.n_heads, model.head_dim, model.q_lora_rank
    query = d * h * qk if q == 0 else d * q + q * h * qk
    kv = d * (model.kv_lora_rank + model.qk_rope_head_dim)
    kv += model.kv_lora_rank * h * (model.qk_nope_head_dim + model.v_head_dim)
    return 2 * (query + kv + h * model.v_head_dim * d)


def ffn_flops_per_token(model: ModelConfig, moe: MoEConfig, layer_id: int) -> int:
    """Forward FLOPs per token of block `layer_id`'s feed-forward: dense SwiGLU or the active MoE part."""
    d = model.dim
    if not model.is_moe_layer(layer_id):
        return 2 * 3 * d * model.ffn_hidden
    router = 2 * d * (moe.num_experts + moe.shared_expert_gate)  # the gate: one more output column
    return router + 2 * 3 * d * (moe.expert_hidden * moe.top_k + moe.shared_hidden)


def forward_flops_per_token(model: ModelConfig, moe: MoEConfig, seq_len: int) -> int:
    """Forward matmul FLOPs per token of the whole model at sequence length `seq_len` (formula above)."""
    projections, scores = attention_flops_per_token(model, seq_len)
    layers = range(model.n_layers + model.mtp_layers)  # each MTP module's block too (moe/mtp.py)
    blocks = sum(projections + scores + ffn_flops_per_token(model, moe, i) for i in layers)
    mtp = model.mtp_layers * 2 * 2 * model.dim * model.dim  # each MTP module's projection, [D, 2D]
    return blocks + mtp + (1 + model.mtp_layers) * 2 * model.dim * model.vocab_size  # the head once per depth


def train_flops_per_token(model: ModelConfig, moe: MoEConfig, seq_len: int) -> int:
    """Forward + backward FLOPs per token: 3 x forward."""
    return 3 * forward_flops_per_token(model, moe, seq_len)


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """Per-device peak for MFU: the override, the device table's bf16 peak (profiling/devices.py), or the
    measured CPU GEMM rate (fp32)."""
    if override:
        return override
    if device.type == "cuda":
        return gpu_peak_tflops(torch.cuda.get_device_name(device))
    return cpu_peak_tflops()


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process in GB (1e9 bytes): CUDA max allocated, or the CPU max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux
