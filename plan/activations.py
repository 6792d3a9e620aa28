"""Activation memory by formula: what autograd keeps per block and micro-batch, and the peaks on top of it.

Shape legend: T tokens of one micro-batch on a data-parallel rank (micro-batch rows x S), S sequence length,
D model dim, H/G query/kv heads and Hd their width (all split by tp), F dense FFN hidden (split by tp), E
experts, K top-k, Fe expert hidden, Fs shared-expert hidden, V vocab (split by tp), A routed rows a rank sends,
R routed rows it receives, Q/L/R/N/Vd the MLA widths (q_lora_rank, kv_lora_rank, qk_rope, qk_nope, v_head).

Each term is what this trainer's autograd graph saves for backward, counted tensor by tensor from the code
(tests/unit/test_plan_activations.py checks the per-part totals against torch's saved-tensor hooks on CPU,
exactly, for GQA, qk-norm, MLA, dense, MoE with shared experts, sigmoid and expert-choice routing), in bytes:

    norm (RMSNorm)          x, x * rstd (in its input dtype), rstd (fp32)         T_n * (2 D b_res + 4)
    linear input            the normed activation a projection saves              T * D * b_cast
    GQA core (flash/SDPA)   q, k, v, out (= wo's input), log-sum-exp            T * ((2 H + 2 G) Hd b + 4 H)
    qk-norm head / full     q and k before RoPE, normalised, rstd per head / row
    MLA                     q_a (x, normed, wq_b input), the kv_a output, normed latent, wkv_b input, core
                            q, k (N + R per head), v, and either out + lse (flash) or the S x S
                            probabilities and a separate wo input (CPU math SDPA, which MLA's Vd != N + R needs)
    dense SwiGLU            h1, silu(h1), h3, the product (w2's input)          4 T F b
    MoE router              gate input (fp32), logits, scores, top-k ids, weights, lse       T (4 D + 8 E + 12 K + 12)
    MoE rows sent           gather/combine indices, fp32 weights, returned rows y            A (D b + 28)
    MoE rows received       grouped-matmul input, h1, silu, h3, product (+ 2 regroup indices under EP)
                                                                                 R ((D + 4 Fe) b [+ 16])
                            (uncompiled on CPU the experts' hand-written backward keeps h1 and h3 alone:
                            R ((D + 2 Fe) b [+ 16]), `Shape.cpu_eager`; the rows sent keep A (D b + 20)
                            where the combine is the sparse product, `sparse_combine`)
    shared experts          4 T Fs b
    head                    final norm, output input, fp32 log-softmax            T (... + 4 V)

with b the activation bytes (4 in fp32; 2 under bf16 autocast), b_res the residual stream's (4; 2 when FSDP
casts to bf16) and b_cast what a projection saves of its input (the bf16 cast under autocast, else b_res).
Under tensor parallelism attention and dense FFN keep their heads' and columns' share, norms run on T/tp
tokens with sequence parallelism (T without), and each tp rank routes T/tp tokens of every MoE layer.
Under expert parallelism a rank receives R = A x moe_headroom rows (cluster.moe_headroom: the stated imbalance;
with one expert-parallel rank there is none, R = A).

Peaks beyond the saved tensors: the loss backward holds two fp32 [T, V/tp] gradients; a block's backward holds
its incoming gradient and the gradients of its largest intermediates; recomputation (activation checkpointing)
rebuilds one block's saved tensors at a time, on top of every block's saved input.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.experts import hand_backward_on_cpu

FP32 = 4
INDEX = 8  # int64


@dataclass(frozen=True)
class Shape:
    """One rank's view of one micro-batch: how many tokens, how they are split, and in what dtypes."""

    rows: int
    """Sequences per micro-batch on this data-parallel rank."""
    seq: int
    tp: int = 1
    sp: bool = False
    ep: int = 1
    headroom: float = 1.0
    act: int = FP32
    """Bytes of a matmul activation (4 fp32, 2 under bf16 autocast)."""
    res: int = FP32
    """Bytes of the residual stream (2 when FSDP's mixed precision casts the blocks' inputs to bf16)."""
    cast: int = FP32
    """Bytes of a projection's saved input: the bf16 cast under autocast, else the residual's."""
    math_attention: bool = False
    """The CPU runs MLA's attention on SDPA's math path (its flash kernel needs equal q/k and v widths)."""
    cpu_eager: bool = False
    """Uncompiled on CPU, where the experts' backward is written by hand and saves less (moe/experts.py
    `SwiGLUGroupedMM`: x, gate and up)."""
    ep_chunks: int = 1
    """Token chunks the expert-parallel dispatcher sends and combines one by one (parallel.ep_overlap=chunked)."""
    cp: int = 1
    """Context-parallel ranks sharing each row: `seq` is this rank's S / cp positions, and attention keeps the
    keys and values of all S, gathered (parallel/context.py)."""

    @property
    def tokens(self) -> int:
        return self.rows * self.seq

    @property
    def norm_tokens(self) -> int:
        return self.tokens // self.tp if self.sp else self.tokens

    @property
    def moe_tokens(self) -> int:
        """Tokens each tp rank routes: its slice of every sequence."""
        return self.tokens // self.tp


def norm_bytes(width: int, tokens: int, in_bytes: int) -> int:
    """RMSNorm saves its input and the normalised input (input dtype) and rstd (fp32) per row."""
    return tokens * (2 * width * in_bytes + FP32)


def attention_bytes(m: ModelConfig, s: Shape) -> dict[str, int]:
    """Saved by one block's attention half: its norm, the projections' input and the attention itself."""
    T, b = s.tokens, s.act
    out = {"norm": norm_bytes(m.dim, s.norm_tokens, s.res), "attn_in": T * m.dim * s.cast}
    if getattr(m, "attention", "gqa") == "mla":
        out["attn"] = _mla_bytes(m, s)
        return out
    H, G, hd = m.n_heads // s.tp, m.n_kv_heads // s.tp, m.head_dim
    core = T * (2 * H * hd * b + FP32 * H) + T * s.cp * 2 * G * hd * b  # k and v: the whole row's under cp
    qk_norm = getattr(m, "qk_norm", "none")
    if qk_norm == "head":
        core += T * (2 * (H + G) * hd * b + FP32 * (H + G))
    elif qk_norm == "full":
        core += T * (2 * (H + G) * hd * b + 2 * FP32)
    out["attn"] = core
    return out


def _mla_bytes(m: ModelConfig, s: Shape) -> int:
    T, b, H = s.tokens, s.act, m.n_heads // s.tp
    Q, L, R, N, Vd = m.q_lora_rank, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
    latent = T * (3 * Q * b + FP32) if Q > 0 else 0  # wq_a's output (the norm's input), normed, wq_b's input
    # wkv_a's whole output, normed latent; wkv_b's input (the whole row's latents under cp)
    kv = T * ((L + R) * b + FP32 + L * b) + T * s.cp * L * b
    qkv = T * H * (N + R) * b + T * s.cp * H * (N + R + Vd) * b  # q; k and v of the whole row
    if s.math_attention:
        core = T * H * (s.seq * s.cp * b + Vd * b)  # S x S probabilities, and wo's input (a copy)
    else:
        core = T * H * (Vd * b + FP32)  # out (= wo's input) and log-sum-exp
    return latent + kv + qkv + core


def dense_ffn_bytes(m: ModelConfig, s: Shape) -> dict[str, int]:
    T = s.tokens
    return {
        "norm": norm_bytes(m.dim, s.norm_tokens, s.res),
        "ffn_in": T * m.dim * s.cast,
        "ffn": 4 * T * (m.ffn_hidden // s.tp) * s.act,
    }


def routed_rows(e: MoEConfig, s: Shape) -> tuple[int, int]:
    """(rows sent A, rows received R) of one MoE layer on one rank for one micro-batch."""
    T, K, E = s.moe_tokens, e.top_k, e.num_experts
    if e.router == "expert_choice":
        per_expert = min(s.seq, ceil((e.capacity_factor or 1.0) * s.seq * K / E))
        sent = E * per_expert * s.rows // s.tp  # each tp rank holds its picks among its slice
    elif e.capacity_factor is not None:
        sent = min(T * K, E * ceil(e.capacity_factor * s.seq * K / E) * s.rows // s.tp)
    else:
        sent = T * K
    received = ceil(sent * s.headroom) if s.ep > 1 else sent
    return sent, received


def moe_bytes(m: ModelConfig, e: MoEConfig, s: Shape) -> dict[str, int]:
    """Saved by one MoE block's second half: norm, router, routed rows, shared experts."""
    T, D, b = s.moe_tokens, m.dim, s.act
    E, K = e.num_experts, e.top_k
    sent, received = routed_rows(e, s)
    if e.router == "expert_choice":
        router = T * (2 * E * FP32 + FP32) + sent * INDEX
    else:
        router = T * (2 * E * FP32 + K * (INDEX + FP32) + 3 * FP32 + (FP32 if e.router == "sigmoid_topk" else 0))
    gate_in = T * D * FP32  # the router runs in fp32 on its own copy (or view) of the input
    shared = e.num_shared_experts * e.expert_hidden
    if shared and s.tp > 1 and not s.sp:
        gate_in += T * D * s.cast  # the shared experts' input: a second copy of this rank's slice
    ep_indices = 2 * INDEX if s.ep > 1 else 0
    # Indices per sent row: the gather's token, the sort order, and the combine's token except where the
    # sparse combine reads the order itself.
    indices = 2 if sparse_combine(e, s) else 3
    expert_widths = 2 if s.cpu_eager and hand_backward_on_cpu(e, D) else 4  # gate, up [, silu, product]
    return {
        "norm": norm_bytes(D, s.norm_tokens, s.res),
        "router": gate_in + router,
        "moe_sent": sent * (D * b + indices * INDEX + FP32),  # y, the indices, the fp32 weights
        "moe_received": received * ((D + expert_widths * e.expert_hidden) * b + ep_indices),
        "shared": 4 * T * shared * b,
    }


def sparse_combine(e: MoEConfig, s: Shape) -> bool:
    """Whether the combine runs as moe/combine.py's sparse product: on CPU uncompiled, every assignment of
    token-choice routing (no capacity drops, not the static dispatcher), in one chunk (bf16 rows too: the
    product runs in the router weights' fp32). It assumes a build with MKL's kernel (x86); without it the
    combine keeps one more index per row."""
    token_choice = e.router != "expert_choice" and e.capacity_factor is None and e.dispatch != "static"
    return s.cpu_eager and token_choice and s.ep_chunks == 1


def block_bytes(m: ModelConfig, e: MoEConfig, s: Shape, is_moe: bool) -> dict[str, int]:
    """Everything one block saves for one micro-batch, by part."""
    ffn = moe_bytes(m, e, s) if is_moe else dense_ffn_bytes(m, s)
    attn = attention_bytes(m, s)
    return {"norm": attn.pop("norm") + ffn.pop("norm"), **attn, **ffn}


def embedding_bytes(s: Shape) -> int:
    """The token ids the embedding's backward reads (vocab-parallel: also the ids shifted into the shard)."""
    return s.tokens * INDEX * (2 if s.tp > 1 else 1)


def head_bytes(m: ModelConfig, s: Shape) -> int:
    """Final norm, the output projection's input, the fp32 log-softmax over this rank's vocabulary (and, for
    the vocab-parallel loss, its per-token statistics)."""
    vocab = m.vocab_size // s.tp
    stats = 4 * FP32 if s.tp > 1 else 0
    return norm_bytes(m.dim, s.norm_tokens, s.res) + s.tokens * (m.dim * s.cast + vocab * FP32 + stats)


def head_backward_bytes(m: ModelConfig, s: Shape) -> int:
    """Held on top of everything saved while the loss's backward runs: two fp32 [T, V/tp] gradients (three
    for the vocab-parallel loss, whose backward rebuilds the softmax)."""
    return (3 if s.tp > 1 else 2) * s.tokens * (m.vocab_size // s.tp) * FP32


def _hand_backward_working(m: ModelConfig, e: MoEConfig, s: Shape) -> int:
    """What the CPU's hand-written backwards hold at a block's backward peak beyond the saved tensors and the
    rows' gradients: the expert backward's [R, Fe] gradient of the hidden (its other temporaries live in the
    kept buffer, `scratch_bytes`), and the combine's weighted [A, D] gradient where autograd kept y * w."""
    if not s.cpu_eager:
        return 0
    sent, received = routed_rows(e, s)
    experts = received * e.expert_hidden * s.act if hand_backward_on_cpu(e, m.dim) else 0
    return experts + sent * m.dim * s.act


def scratch_bytes(m: ModelConfig, e: MoEConfig, s: Shape) -> int:
    """moe/scratch.py's buffer, held from the first MoE backward on: the largest set of temporaries one expert
    call takes, the backward's silu(gate) [R, Fe] and gate/up gradient [R, 2 Fe], plus [W1 | W3]
    [E/ep, D, 2 Fe] where the input gradient concatenates them (moe/experts.py `_input_grad_concatenates`)."""
    if not (s.cpu_eager and hand_backward_on_cpu(e, m.dim)):
        return 0
    _, received = routed_rows(e, s)
    local, hidden = e.num_experts // s.ep, e.expert_hidden
    weights = 2 * local * m.dim * hidden if local * hidden <= received else 0
    return (3 * received * hidden + weights) * s.act


def block_backward_bytes(m: ModelConfig, e: MoEConfig, s: Shape, is_moe: bool) -> int:
    """Held on top of the saved tensors during one block's backward: the incoming gradient [T, D] and the
    gradients of the widest intermediate (the routed rows' [R, D] output and its weighted copy, which the
    combine's plain ops hold in fp32, or the dense FFN's hidden)."""
    T, D = s.tokens, m.dim
    incoming = T * D * s.res
    if is_moe:
        _, received = routed_rows(e, s)
        weighted = s.act if s.cpu_eager else FP32  # moe/combine.py sums (and differentiates) in fp32
        return incoming + received * D * (s.act + weighted) + _hand_backward_working(m, e, s)
    return incoming + 2 * T * (m.ffn_hidden // s.tp) * s.act
