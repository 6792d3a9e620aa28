"""Decoder-only transformer with MoE feed-forward blocks.

Shape legend: B batch, S sequence, D model dim, V vocab. Attention (GQA or MLA) and RoPE live in moe/attention.py.

The model is written with no parallelism. `parallel/` shards it in place; for that the code reads head
counts from tensor shapes (tensor parallelism keeps only some heads per rank), blocks live in a ModuleDict
keyed by layer id (pipeline stages delete blocks and keep the names), and the embedding, final norm and
output may be None on a pipeline stage that does not own them.

Packed documents (data.document_mask): `forward(tokens, doc_ids)` turns the document ids into per-token
positions and a block-causal mask once (moe/masking.py: dense for SDPA, a BlockMask where FlexAttention
attends, `moe.attention.attention_mask`) and hands both to every block, so a token attends only within its
document and its rotary position counts from the document's start. Tensor parallelism
keeps that correct as it is: every tp rank holds the whole sequence of tokens, and attention runs on the
whole sequence (the sequence-parallel slices are all-gathered before it). A pipeline stage after the first
takes hidden states, and the trainer hands it the document ids as well (`Trainer._stage_kwargs`).
"""

from __future__ import annotations

import torch
from torch import nn

from moeyard.moe.attention import attention_mask, build_attention, rope_table
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.init import init_full_tensor as init_full_tensor  # re-exported: the full tensor, for tests
from moeyard.moe.init import init_slice_
from moeyard.moe.layer import MoELayer, SwiGLU
from moeyard.moe.masking import document_positions


class Block(nn.Module):
    """Pre-norm transformer block: attention then a dense or MoE feed-forward."""

    def __init__(self, layer_id: int, cfg: ModelConfig, moe_cfg: MoEConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = build_attention(cfg, layer_id)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_id)
        self.moe = MoELayer(cfg.dim, moe_cfg) if self.is_moe else None
        self.feed_forward = None if self.is_moe else SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(self, x_BSD: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """rope: the table or per-token angles (`moe.attention.apply_rope`); mask: block-causal or None."""
        # mask by keyword: tensor parallelism's input hook re-lays out the positional inputs only.
        h = x_BSD + self.attention(self.attention_norm(x_BSD), rope, mask=mask)
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
        self.register_buffer("rope", rope_table(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, cfg), persistent=False)

    def forward(self, tokens_or_h: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] (or hidden states); doc_ids [B, S] int (`train.data.document_ids`) keeps packed
        documents apart, None = one causal sequence per row."""
        h = self.tok_embeddings(tokens_or_h) if self.tok_embeddings is not None else tokens_or_h
        rope = self.rope if doc_ids is None else self.rope[document_positions(doc_ids)]  # or [B, S, R/2, 2]
        mask = attention_mask(self.cfg, doc_ids, h)  # once for every block: dense, BlockMask or None
        for block in self.layers.values():
            h = block(h, rope, mask)
            if block.moe is not None:
                block.moe.take_pending_stats()  # a compiled block's routing statistics (MoELayer._record)
        if self.norm is not None:
            h = self.norm(h)
        return self.output(h) if self.output is not None else h

    def moe_layers(self) -> dict[str, MoELayer]:
        """The MoE layers this (possibly partial) model holds, by layer id."""
        return {lid: b.moe for lid, b in self.layers.items() if b.moe is not None}

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recomputes non-persistent buffers (after building on the meta device)."""
        self.rope = rope_table(self.cfg.rope_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.cfg).to(device)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """Initialises an unsharded model in place (one process; `parallel/` fills each shard from the same values)."""
    for fqn, param in model.named_parameters():
        init_slice_(param, fqn, param.shape, [0] * param.ndim, model.cfg, seed)
    for moe in model.moe_layers().values():
        moe.router.expert_bias.zero_()
    model.reset_buffers(next(model.parameters()).device)
