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

Multi-token prediction (model.mtp_layers, moe/mtp.py): the output is the main logits followed by each MTP
module's along the sequence dim, [B, (1 + mtp_layers) * S, V], when the caller hands the token ids as
`mtp_tokens` (the trainer does; generation and evaluation get the main logits alone). Its blocks sit in
`layers` after the main ones and run only after the final norm; a pipeline's last stage holds them, with the
embedding they share.
"""

from __future__ import annotations

import torch
from torch import nn

from moeyard.moe.attention import SequenceShard, attention_mask, build_attention, rope_table
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.init import init_full_tensor as init_full_tensor  # re-exported: the full tensor, for tests
from moeyard.moe.init import init_slice_
from moeyard.moe.layer import MoELayer, SwiGLU
from moeyard.moe.masking import document_positions
from moeyard.moe.mtp import MTPModule, mtp_block_ids, shifted_tokens


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
        blocks = cfg.n_layers + cfg.mtp_layers  # the MTP modules' blocks follow the main ones
        self.layers = nn.ModuleDict({str(i): Block(i, cfg, moe_cfg) for i in range(blocks)})
        self.mtp = nn.ModuleDict({lid: MTPModule(cfg) for lid in mtp_block_ids(cfg)})
        self.norm: nn.RMSNorm | None = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", rope_table(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta, cfg), persistent=False)
        self.context: SequenceShard | None = None
        """Set by context parallelism: the positions of every row this rank holds (its blocks' attention has
        the same); tokens and hidden states are then [B, Sl], doc_ids still the whole rows' [B, S]."""

    def forward(
        self, tokens_or_h: torch.Tensor, doc_ids: torch.Tensor | None = None, mtp_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens [B, S] (or hidden states); doc_ids [B, S] int (`train.data.document_ids`) keeps packed
        documents apart, None = one causal sequence per row; mtp_tokens [B, S]: the token ids, which ask a
        model with MTP modules for their logits too (a pipeline stage without them ignores it)."""
        # A pipeline's last stage holds the embedding too under MTP, and takes hidden states.
        is_ids = not tokens_or_h.is_floating_point()
        h = self.tok_embeddings(tokens_or_h) if is_ids else tokens_or_h
        rope, mask = self._rope_and_mask(doc_ids, h)
        for lid, block in self.layers.items():
            if lid not in self.mtp:
                h = self._run_block(block, h, rope, mask)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        logits = self.output(h)
        if not self.mtp or mtp_tokens is None:
            return logits
        return torch.cat([logits, *self._mtp_logits(h, mtp_tokens, rope, mask)], dim=1)

    def _rope_and_mask(self, doc_ids: torch.Tensor | None, h: torch.Tensor) -> tuple[torch.Tensor, object]:
        """Rotary angles (the table, or per token [B, S, R/2, 2]) and the mask every block attends with, built
        once for all of them (dense, BlockMask or None); under context parallelism for this rank's positions."""
        positions = document_positions(doc_ids) if doc_ids is not None else None  # [B, S], or None: 0 .. S-1
        if self.context is not None:  # this rank's positions of the whole rows
            pos_S = self.context.positions_S
            positions = positions[:, pos_S] if positions is not None else pos_S
        rope = self.rope if positions is None else self.rope[positions]
        return rope, attention_mask(self.cfg, doc_ids, h, self.context)

    @staticmethod
    def _run_block(block: nn.Module, h: torch.Tensor, rope: torch.Tensor, mask) -> torch.Tensor:
        h = block(h, rope, mask)
        if block.moe is not None:
            block.moe.take_pending_stats()  # a compiled block's routing statistics (MoELayer._record)
        return h

    def _mtp_logits(self, h_BSD: torch.Tensor, tokens_BS: torch.Tensor, rope: torch.Tensor, mask) -> list:
        """Each MTP module's logits [B, S, V], depth 1 first (moe/mtp.py); h_BSD: the main model's normed
        output, h^0."""
        out = []
        for k, (lid, module) in enumerate(self.mtp.items(), start=1):
            h_BSD = module.combine(self.tok_embeddings(shifted_tokens(tokens_BS, k)), h_BSD)
            h_BSD = self._run_block(self.layers[lid], h_BSD, rope, mask)
            out.append(self.output(module.norm(h_BSD)))
        return out

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
