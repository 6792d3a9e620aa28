"""Causal self-attention: grouped-query attention (with the q/k norms and biases of Qwen and OLMoE) and
DeepSeek's multi-head latent attention, both with rotary position embeddings.

Shape legend: B batch, S sequence, D model dim, H query heads, G kv heads, Hd head dim, R rotary channels
per head, N non-rotary q/k channels per head (MLA), Vd value head dim (MLA), L latent width (MLA).

Written with no parallelism: head counts come from tensor shapes (tensor parallelism keeps H/tp heads per
rank), and what `parallel/tensor.py` must know about each module is stated in its docstring.

RoPE convention (one for every family): `apply_rope` rotates adjacent channel pairs (2i, 2i+1) of each
head and leaves them in place. Hugging Face's Llama, Mixtral, Qwen2/Qwen3 and OLMoE rotate (i, i + Hd/2)
("rotate_half") with the same frequencies; their q/k weights map onto ours by permuting the rows of each
head, HF (i, i + Hd/2) -> ours (2i, 2i+1), as train/hf.py does for Mixtral (`_rope_rows_from_hf`). Every
per-channel q/k quantity moves with its rows: q/k biases, per-head and full-width q/k norm weights. Norm
statistics (mean squares over a head or over all heads) and attention scores do not change when q and k
share one permutation, so nothing else does. DeepSeek-V3 (HF `rope_interleave=True`, its default and the
published checkpoints' layout) already rotates pairs (2i, 2i+1): no permutation (HF writes the rotated
pairs out de-interleaved, but for q and k alike, which leaves scores unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from moeyard.moe.config import ModelConfig
from moeyard.moe.masking import block_causal_mask, context_mask, flex_block_mask, sliding_window_mask

try:  # flash-attn is a GPU-only extra; SDPA serves everywhere else.
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class SequenceShard(Protocol):
    """This rank holds only some positions of every row (context parallelism, supplied by `parallel/`)."""

    seq_len: int
    """S, the whole row's length."""
    positions_S: torch.Tensor
    """int64 [Sl]: the global position of each token this rank holds, in the order it holds them."""

    def gather(self, x_BSl: torch.Tensor) -> torch.Tensor:
        """Every rank's tokens of the rows, whole and in position order: [B, Sl, ...] -> [B, S, ...]; its
        gradient reaches each rank's own tokens."""
        ...


def rope_table(head_dim: int, max_seq_len: int, theta: float, yarn: ModelConfig | None = None) -> torch.Tensor:
    """cos/sin table [S, Hd/2, 2] for rotary position embeddings; with `yarn` (a config whose rope_scaling is
    yarn), YaRN's frequencies and cos/sin scale (`yarn_frequencies`)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scale = 1.0
    if yarn is not None and yarn.rope_scaling == "yarn":
        inv_freq, scale = yarn_frequencies(inv_freq, head_dim, theta, yarn)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return (scale * torch.stack([angles.cos(), angles.sin()], dim=-1)).float()


def yarn_mscale(factor: float, a: float) -> float:
    """YaRN's attention temperature m(s, a) = 0.1 a ln s + 1 (1 when the context is not extended)."""
    return 1.0 if factor <= 1 else 0.1 * a * math.log(factor) + 1.0


def yarn_frequencies(
    inv_freq: torch.Tensor, head_dim: int, theta: float, cfg: ModelConfig
) -> tuple[torch.Tensor, float]:
    """YaRN ("NTK-by-parts", Peng et al., 2023): pairs whose wavelength fits many times (>= beta_fast turns)
    into the pre-training context keep their frequency, those turning fewer than beta_slow times are divided
    by the factor, and a linear ramp over the pair index blends the two between (its ends rounded outward, as
    transformers and DeepSeek do, unless yarn_truncate is false). Returns the frequencies and the cos/sin scale
    (config field docs)."""
    s, original = cfg.yarn_factor, cfg.yarn_original_max_seq_len

    def pair_turning(turns: float) -> float:  # the pair index whose wavelength fits `turns` times
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(cfg.yarn_beta_fast), pair_turning(cfg.yarn_beta_slow)
    if cfg.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    keep = 1 - ramp
    blended = inv_freq / s * ramp + inv_freq * keep
    if cfg.yarn_mscale and cfg.yarn_mscale_all_dim:
        scale = yarn_mscale(s, cfg.yarn_mscale) / yarn_mscale(s, cfg.yarn_mscale_all_dim)
    else:
        scale = yarn_mscale(s, 1.0)
    return blended, scale


def apply_rope(x_BSHd: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotates pairs of channels by position-dependent angles (Su et al., 2021).

    `rope` is the table [S_max, R/2, 2] (token s at position s) or the angles of each token [B, S, R/2, 2]
    (the table indexed by per-token positions: packed documents restart their positions). Heads wider than
    R (model.partial_rotary_factor < 1, GLM-4.5) rotate their first R channels and pass the rest unchanged.
    """
    rotary = 2 * rope.shape[-2]
    if x_BSHd.shape[-1] > rotary:
        return torch.cat([apply_rope(x_BSHd[..., :rotary], rope), x_BSHd[..., rotary:]], dim=-1)
    if rope.ndim == 4:
        cos, sin = rope[:, :, None, :, 0], rope[:, :, None, :, 1]
    else:
        S = x_BSHd.shape[1]
        cos, sin = rope[:S, None, :, 0], rope[:S, None, :, 1]
    x1, x2 = x_BSHd.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x_BSHd)


FUSED_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
"""SDPA's fused backends: on CUDA every SDPA call is limited to these, so a call that only the math kernel takes
(fp32 [B, H, S, S] scores and probabilities, 2 GiB each per layer at S = 4096) raises instead of running."""

_FLASH_MAX_HEAD_DIM = 256
"""The widest head that flash attention (SDPA's kernel and flash-attn 2) takes."""


def flash_fits(dtype: torch.dtype, qk_dim: int, v_dim: int) -> bool:
    """Whether flash attention takes heads of these widths in this dtype (half precision, q/k/v alike)."""
    return dtype in (torch.float16, torch.bfloat16) and qk_dim == v_dim <= _FLASH_MAX_HEAD_DIM


def attention_kernel(
    impl: str, device_type: str, dtype: torch.dtype, documents: bool, gqa: bool, qk_dim: int, v_dim: int
) -> str:
    """The kernel that attends (`model.attn_impl`): "flash_attn" (flash-attn's dense causal call), "sdpa" or
    "flex" (FlexAttention with a BlockMask), for q/k heads `qk_dim` and v heads `v_dim` wide in `dtype`.

    auto: on CUDA, FlexAttention where SDPA's fused kernels cannot take the call: packed documents (flash takes
    no mask; memory-efficient takes a dense [B, 1, S, S] one but no GQA, and computes every masked-out tile)
    and GQA outside flash's dtypes and widths (memory-efficient takes no GQA); SDPA otherwise (flash, or
    memory-efficient for MLA's unequal widths). Elsewhere SDPA, as it always was: off CUDA torch runs
    FlexAttention eagerly (the math kernel's cost) and has no backward for it. flash: flash-attn where it fits
    (installed, CUDA, half precision, no documents), else as auto. sdpa: always SDPA, whose refusals raise on
    CUDA (FUSED_SDPA). flex: always.
    """
    if impl == "flex":
        return "flex"
    if impl == "sdpa" or device_type != "cuda":
        return "sdpa"
    fits = flash_fits(dtype, qk_dim, v_dim)
    if impl == "flash" and flash_attn_func is not None and fits and not documents:
        return "flash_attn"
    return "flex" if documents or (gqa and not fits) else "sdpa"


def model_kernel(cfg: ModelConfig, device_type: str, dtype: torch.dtype, documents: bool) -> str:
    """`attention_kernel` for the attention of `cfg` (GQA where kv heads are fewer; MLA's widths)."""
    if cfg.attention_sinks or cfg.sliding_window:  # SDPA with a dense mask (`attend`); flex refuses them
        return "sdpa" if cfg.attn_impl != "flex" else "flex"
    mla = cfg.attention == "mla"
    gqa = not mla and cfg.n_kv_heads != cfg.n_heads
    v_dim = cfg.v_head_dim if mla else cfg.head_dim
    return attention_kernel(cfg.attn_impl, device_type, dtype, documents, gqa, cfg.head_dim, v_dim)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype q, k and v will have: autocast's where it is on for x's device, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def attention_mask(
    cfg: ModelConfig, doc_ids_BS: torch.Tensor | None, x_BSD: torch.Tensor, shard: SequenceShard | None = None
) -> torch.Tensor | BlockMask | None:
    """The mask every block attends with in one micro-batch, built once for all of them (`attend` takes it).

    Args:
        cfg: the model config (attn_impl and the head shapes decide the kernel, `attention_kernel`).
        doc_ids_BS: document ids [B, S] (`train.data.document_ids`) of whole rows, or None for one causal
            sequence per row.
        x_BSD: the blocks' input (its device, dtype and sequence length).
        shard: the positions this rank holds of every row (context parallelism), or None for all of them.

    Returns:
        A BlockMask where FlexAttention attends, else the dense block-causal mask bool [B, 1, S, S] with
        documents, else None (causal). With `shard`, the rows of its queries against the whole row's keys
        [B or 1, 1, Sl, S] (never None: SDPA's causal flag aligns unequal query and key counts otherwise).
    """
    documents = doc_ids_BS is not None
    kernel = model_kernel(cfg, x_BSD.device.type, compute_dtype(x_BSD), documents or shard is not None)
    if shard is not None:
        if kernel == "flex":
            return flex_block_mask(doc_ids_BS, shard.seq_len, x_BSD.device, shard.positions_S)
        return context_mask(doc_ids_BS, shard.positions_S, shard.seq_len)
    if kernel == "flex":
        return flex_block_mask(doc_ids_BS, x_BSD.shape[1], x_BSD.device)
    return block_causal_mask(doc_ids_BS) if documents else None


@cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process: eager, it is a reference that builds the whole score matrix.
    dynamic=False: a run's shapes are fixed, and a dynamic kernel is slower."""
    return torch.compile(flex_attention, dynamic=False)


def attend(
    q_BSHd: torch.Tensor,
    k_BSHd: torch.Tensor,
    v_BSHd: torch.Tensor,
    mask: torch.Tensor | BlockMask | None = None,
    scale: float | None = None,
    use_flash: bool = False,
    sinks_H: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention scaled by `scale` (None: 1/sqrt(q/k head dim)); k and v may have fewer heads
    (GQA) and v another head dim (MLA). -> [B, S, H, Vd]. `sinks_H`: one logit per head added to every
    softmax's denominator (`_sdpa_with_sinks`; a dense mask or None only).

    `mask` (`attention_mask`) picks the kernel: a BlockMask runs FlexAttention (compiled on CUDA); a bool
    tensor [B, 1, S, S] (True = may attend; `moe.masking.block_causal_mask`) replaces SDPA's causal mask;
    None is causal: flash-attn with `use_flash` where it fits (`flash_fits`), else SDPA. On CUDA SDPA may use
    only its fused kernels (FUSED_SDPA): a call only the math kernel takes raises "No available kernel".
    """
    gqa = q_BSHd.shape[2] != k_BSHd.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q_BSHd, k_BSHd, v_BSHd))
    if isinstance(mask, BlockMask):
        flex = _compiled_flex() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa).transpose(1, 2)
    if sinks_H is not None:
        return _sdpa_with_sinks(q, k, v, mask, scale, sinks_H).transpose(1, 2)
    fits = flash_fits(q.dtype, q.shape[-1], v.shape[-1])
    if use_flash and mask is None and flash_attn_func is not None and q.is_cuda and fits:
        return flash_attn_func(q_BSHd, k_BSHd, v_BSHd, causal=True, softmax_scale=scale)
    sdpa = fused_sdpa if q.is_cuda else _sdpa
    return sdpa(q, k, v, mask, scale, gqa).transpose(1, 2)


def _sdpa(
    q_BHSd: torch.Tensor,
    k_BGSd: torch.Tensor,
    v_BGSd: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    gqa: bool,
) -> torch.Tensor:
    """SDPA, causal where `mask` is None. -> [B, H, S, Vd]."""
    causal = mask is None
    return F.scaled_dot_product_attention(
        q_BHSd, k_BGSd, v_BGSd, attn_mask=mask, is_causal=causal, enable_gqa=gqa, scale=scale
    )


def _sdpa_with_sinks(
    q_BHSd: torch.Tensor,
    k_BGSd: torch.Tensor,
    v_BGSd: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    sinks_H: torch.Tensor,
) -> torch.Tensor:
    """SDPA with attention sinks: softmax over [scores | sink_h] with the sink's probability dropped, i.e.
    each head's output shrunk by Z / (Z + exp(sink_h)).

    Done as one extra key and value of zeros whose additive mask entry is sink_h: its score is then exactly
    sink_h and its value adds nothing. Chosen over rescaling by sigmoid(logsumexp - sink) because SDPA does
    not return its logsumexp, and the extra column keeps every kernel that takes a float mask (with its
    gradient, which reaches the sinks) usable. kv heads are expanded: the fused kernel that takes a float
    mask (memory-efficient) takes no GQA. -> [B, H, S, Vd]."""
    B, H, S, _ = q_BHSd.shape
    repeat = H // k_BGSd.shape[1]
    k, v = (t.repeat_interleave(repeat, dim=1) for t in (k_BGSd, v_BGSd))
    k, v = (torch.cat([t, t.new_zeros(B, H, 1, t.shape[-1])], dim=2) for t in (k, v))
    allowed = mask if mask is not None else sliding_window_mask(None, S, S, q_BHSd.device)
    bias = torch.zeros(allowed.shape, dtype=q_BHSd.dtype, device=q_BHSd.device).masked_fill(~allowed, float("-inf"))
    sink = sinks_H.to(q_BHSd.dtype).view(1, H, 1, 1).expand(bias.shape[0], H, S, 1)
    bias = torch.cat([bias.expand(-1, H, -1, -1), sink], dim=-1)
    sdpa = fused_sdpa if q_BHSd.is_cuda else _sdpa
    return sdpa(q_BHSd, k, v, bias, scale, False)


def fused_sdpa(
    q_BHSd: torch.Tensor,
    k_BGSd: torch.Tensor,
    v_BGSd: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    gqa: bool,
) -> torch.Tensor:
    """SDPA limited to its fused kernels (FUSED_SDPA): a call none of them takes raises RuntimeError ("No
    available kernel", after warnings saying why each declined) instead of running the math kernel silently.
    -> [B, H, S, Vd]."""
    with sdpa_kernel(FUSED_SDPA):
        return _sdpa(q_BHSd, k_BGSd, v_BGSd, mask, scale, gqa)


class PlainRMSNorm(nn.Module):
    """RMSNorm over the last dim as Hugging Face writes it (statistics in fp32, the weight applied in the input
    dtype), in plain tensor ops so that DTensor can run it on a tensor-parallel slice of the last dim: the mean
    of squares of a Shard(-1) input becomes a Partial value, summed over tp by one [B, S, 1] all-reduce."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.type_as(x)


class Sinks(nn.Module):
    """Attention sinks: one learned logit per query head, weight [H]. A module, not a bare parameter, so that
    tensor parallelism can shard it with the heads and hand the attention its local slice (parallel/tensor.py)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads))

    def forward(self) -> torch.Tensor:
        return self.weight


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE; optional q/k/v biases and q/k RMSNorm (before RoPE).

    Parameters and their Hugging Face names (`model.layers.{i}.self_attn.` prefix; [out, in] like ours):
        wq [H*Hd, D] (+ bias [H*Hd])   q_proj   rows permuted per head (RoPE convention above), bias too
        wk [G*Hd, D] (+ bias [G*Hd])   k_proj   rows permuted per head, bias too
        wv [G*Hd, D] (+ bias [G*Hd])   v_proj
        wo [D, H*Hd]                   o_proj
        qk_norm=head (Qwen3-MoE): q_head_norm, k_head_norm [Hd] <- q_norm, k_norm, each permuted like a head's
            rows. One weight shared by all heads: under tensor parallelism it is replicated and each rank sees
            H/tp of the heads, so its gradient is summed over tp (`parallel.tensor.is_tp_partial`).
        qk_norm=full (OLMoE): q_norm [H*Hd], k_norm [G*Hd] <- q_norm, k_norm, each head's Hd slice permuted.
            Normalises the whole projection output before it is split into heads; tensor parallelism shards
            the weight like wq/wk's rows and computes the mean square over the full width.
        qkv_bias (Qwen2, Qwen2-MoE): the q_proj/k_proj/v_proj biases; o_proj has none unless o_bias (gpt-oss).
        sinks.weight [H] (attention_sinks, gpt-oss) <- sinks: one logit per query head (`_sdpa_with_sinks`);
            tensor parallelism shards it with the heads.
    model.sliding_window: the blocks `cfg.window` names narrow their mask to the window (dense; FlexAttention
    takes neither sinks nor windows here: model.attn_impl=flex is refused with them).
    OLMoE's `clip_qkv` is not implemented (null in OLMoE-1B-7B).
    """

    def __init__(self, cfg: ModelConfig, layer_id: int = 0) -> None:
        super().__init__()
        hd, eps = cfg.head_dim, cfg.norm_eps
        self.head_dim = hd
        self.use_flash = cfg.attn_impl == "flash"
        self.window = cfg.window(layer_id)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.o_bias)
        self.sinks = Sinks(cfg.n_heads) if cfg.attention_sinks else None
        full, head = cfg.qk_norm == "full", cfg.qk_norm == "head"
        self.q_norm = PlainRMSNorm(cfg.n_heads * hd, eps) if full else None
        self.k_norm = PlainRMSNorm(cfg.n_kv_heads * hd, eps) if full else None
        self.q_head_norm = PlainRMSNorm(hd, eps) if head else None
        self.k_head_norm = PlainRMSNorm(hd, eps) if head else None
        self.context: SequenceShard | None = None
        """Set by context parallelism: x holds some positions of each row, keys and values are gathered whole."""

    def forward(self, x_BSD: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, D]; rope as `apply_rope` takes it, mask from `attention_mask` (None: causal). -> [B, S, D]."""
        B, S, _ = x_BSD.shape
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, S, -1, self.head_dim), k.view(B, S, -1, self.head_dim)
        if self.q_head_norm is not None:
            q, k = self.q_head_norm(q), self.k_head_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        v = self.wv(x_BSD).view(B, S, -1, self.head_dim)
        if self.context is not None:  # this rank's queries attend to the whole row: one gather of k and v
            k, v = self.context.gather(torch.cat([k, v], dim=-1)).split([k.shape[-1], v.shape[-1]], dim=-1)
        if self.window:
            mask = sliding_window_mask(mask, S, self.window, x_BSD.device)
        sinks_H = self.sinks() if self.sinks is not None else None
        out = attend(q, k, v, mask, use_flash=self.use_flash, sinks_H=sinks_H)
        return self.wo(out.reshape(B, S, -1))


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values are expanded from one L-wide latent per
    token, plus one R-wide rotary key that every head shares; queries come through an optional low-rank
    bottleneck. Each q/k head is [N non-rotary | R rotary] channels; the softmax scale is 1/sqrt(N + R),
    times m(s, yarn_mscale_all_dim)^2 under YaRN (DeepSeek-V3's context extension: (0.1 ln 40 + 1)^2 = 1.87).

    Parameters and their Hugging Face DeepseekV3Attention names (`model.layers.{i}.self_attn.` prefix):
        q_lora_rank = 0:  wq [H*(N+R), D]                  q_proj
        q_lora_rank > 0:  wq_a [Q, D]                      q_a_proj
                          q_a_norm [Q]                     q_a_layernorm
                          wq_b [H*(N+R), Q]                q_b_proj
        wkv_a [L+R, D]    rows [latent | rotary key]       kv_a_proj_with_mqa
        kv_a_norm [L]                                      kv_a_layernorm
        wkv_b [H*(N+Vd), L]  rows per head [k_nope | v]    kv_b_proj
        wo [D, H*Vd]                                       o_proj
    No permutation with `rope_interleave=True` (see the module docstring); with False, the R rotary rows of
    each head of q_proj/q_b_proj and the last R rows of kv_a_proj_with_mqa go (i, i + R/2) -> (2i, 2i+1).
    HF's latent norms use eps 1e-6 whatever rms_norm_eps says; ours use model.norm_eps (DeepSeek-V3: 1e-6).
    Not implemented: attention_bias=true (no published model).

    Tensor parallelism (parallel/tensor.py): wq / wq_b and wkv_b column-parallel over heads, wo row-parallel;
    wq_a, wkv_a and the two latent norms are replicated. The rotary key is shared by all heads, so on each
    rank it receives the gradient of H/tp heads only: the plan sums it over tp (the last R output channels
    of wkv_a), which keeps wkv_a's gradient and the block input's equal to one process's.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        H, D, eps = cfg.n_heads, cfg.dim, cfg.norm_eps
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.latent = cfg.kv_lora_rank
        self.use_flash = cfg.attn_impl == "flash"
        qk = self.nope + self.rope
        self.scale = qk**-0.5
        if cfg.rope_scaling == "yarn" and cfg.yarn_mscale_all_dim:
            self.scale *= yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2
        q_rank = cfg.q_lora_rank
        self.wq = nn.Linear(D, H * qk, bias=False) if q_rank == 0 else None
        self.wq_a = nn.Linear(D, q_rank, bias=False) if q_rank > 0 else None
        self.q_a_norm = PlainRMSNorm(q_rank, eps) if q_rank > 0 else None
        self.wq_b = nn.Linear(q_rank, H * qk, bias=False) if q_rank > 0 else None
        self.wkv_a = nn.Linear(D, self.latent + self.rope, bias=False)
        self.kv_a_norm = PlainRMSNorm(self.latent, eps)
        self.wkv_b = nn.Linear(self.latent, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)
        self.context: SequenceShard | None = None
        """Set by context parallelism: x holds some positions of each row; the normalised latent and the
        rotated key, L + R per token, are gathered whole (not the expanded keys and values, H (N + R + Vd))."""

    def forward(self, x_BSD: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, D]; rope as `apply_rope` takes it, mask from `attention_mask` (None: causal). -> [B, S, D]."""
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD) if self.wq is not None else self.wq_b(self.q_a_norm(self.wq_a(x_BSD)))
        q_nope, q_rope = q.view(B, S, -1, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent_BSL, k_rope_BSR = self.wkv_a(x_BSD).split([self.latent, self.rope], dim=-1)
        latent_BSL, k_rope_BS1R = self.kv_a_norm(latent_BSL), apply_rope(k_rope_BSR.unsqueeze(2), rope)
        if self.context is not None:  # this rank's queries attend to the whole row
            both = self.context.gather(torch.cat([latent_BSL, k_rope_BS1R.squeeze(2)], dim=-1))
            latent_BSL, k_rope_BS1R = both[..., : self.latent], both[..., self.latent :].unsqueeze(2)
        S_kv = latent_BSL.shape[1]
        kv = self.wkv_b(latent_BSL).view(B, S_kv, -1, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rope = k_rope_BS1R.expand(-1, -1, k_nope.shape[2], -1)
        q = torch.cat([q_nope, apply_rope(q_rope, rope)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        return self.wo(attend(q, k, v, mask, self.scale, self.use_flash).reshape(B, S, -1))


def build_attention(cfg: ModelConfig, layer_id: int = 0) -> Attention | MLA:
    """The attention module `cfg.attention` names for block `layer_id` (ValueError naming the field for a bad
    attention config)."""
    cfg.check_attention()
    return MLA(cfg) if cfg.attention == "mla" else Attention(cfg, layer_id)
