"""Decoder-only transformer with MoE feed-forward blocks.

Shape legend: B batch, S sequence, D model dim, H query heads, G kv heads, Hd head dim, V vocab.

The model is written with no parallelism. `parallel/` shards it in place; for that the code reads head
counts from tensor shapes (tensor parallelism keeps only some heads per rank), blocks live in a ModuleDict
keyed by layer id (pipeline stages delete blocks and keep the names), and the embedding, final norm and
output may be None on a pipeline stage that does not own them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig, MoEConfig
from moe.init import init_full_tensor as init_full_tensor  # re-exported: the full tensor, for tests
from moe.init import init_slice_
from moe.layer import MoELayer, SwiGLU

try:  # flash-attn is a GPU-only extra; SDPA serves everywhere else.
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def rope_table(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """cos/sin table [S, Hd/2, 2] for rotary position embeddings."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x_BSHd: torch.Tensor, rope_S2: torch.Tensor) -> torch.Tensor:
    """Rotates pairs of channels by position-dependent angles (Su et al., 2021)."""
    S = x_BSHd.shape[1]
    cos, sin = rope_S2[:S, None, :, 0], rope_S2[:S, None, :, 1]
    x1, x2 = x_BSHd.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x_BSHd)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.use_flash = cfg.attn_impl == "flash"
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = apply_rope(self.wq(x_BSD).view(B, S, -1, self.head_dim), rope)
        k = apply_rope(self.wk(x_BSD).view(B, S, -1, self.head_dim), rope)
        v = self.wv(x_BSD).view(B, S, -1, self.head_dim)
        if self.use_flash and flash_attn_func is not None and q.is_cuda and q.dtype != torch.float32:
            out = flash_attn_func(q, k, v, causal=True)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            ).transpose(1, 2)
        return self.wo(out.reshape(B, S, -1))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a dense or MoE feed-forward."""

    def __init__(self, layer_id: int, cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.moe = MoELayer(cfg.dim, moe_cfg) if self.is_moe else None
        self.feed_forward = None if self.is_moe else SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x_BSD: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        h = x_BSD + self.attention(self.attention_norm(x_BSD), rope)
        ffn = self.moe if self.is_moe else self.feed_forward
        return h + ffn(self.ffn_norm(h))


class Transformer(nn.Module):
    """Token ids [B, S] (or hidden states on later pipeline stages) -> logits [B, S, V] (or hidden states)."""

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.moe_cfg = moe_cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, cfg, moe_cfg) for i in range(cfg.n_layers)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta), persistent=False)

    def forward(self, tokens_or_h: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens_or_h) if self.tok_embeddings is not None else tokens_or_h
        for block in self.layers.values():
            h = block(h, self.rope)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def moe_layers(self) -> dict[str, MoELayer]:
        """The MoE layers this (possibly partial) model holds, by layer id."""
        return {lid: b.moe for lid, b in self.layers.items() if b.moe is not None}

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recomputes non-persistent buffers (after building on the meta device)."""
        self.rope = rope_table(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta).to(device)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialises an unsharded model in place (one process; `parallel/` fills each shard from the same values)."""
    for fqn, param in model.named_parameters():
        init_slice_(param, fqn, param.shape, [0] * param.ndim, model.cfg, seed)
    for moe in model.moe_layers().values():
        moe.router.expert_bias.zero_()
    model.reset_buffers(next(model.parameters()).device)
