"""Multi-token prediction (DeepSeek-V3 report, section 2.2): D sequential modules, module k predicting the
token k + 1 places past the next one.

Shape legend: B batch, S sequence, D model dim, V vocab.

Module k (1..D) combines, at every position i, the previous depth's hidden state h_i^{k-1} (the main model's
last block output for k = 1, before its final norm) with the embedding of token t_{i+k}:

    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]      (M_k: eh_proj, [D, 2D])
    h^k    = TRM_k(h'^k)                                          (one transformer block)
    P^k    = OutHead(RMSNorm_k(h^k))                               (predicts t_{i+k+1})

The report writes the concatenation hidden-first; DeepSeek-V3's released weights (and every implementation
that loads them: vLLM, SGLang, Megatron-Core) put the embedding's half first, so `eh_proj` is read that way.
Emb and OutHead are the main model's own modules (shared, not copies); each module has its own norms,
projection, block and final norm (Hugging Face: `model.layers.{n_layers + k - 1}.` enorm, hnorm, eh_proj,
the block's keys, shared_head.norm).

Sequences keep their length S at every depth (as Megatron-Core's MTP does): t_{i+k} is the input rolled left
by k, so the last k positions see wrapped-around tokens. Attention is causal, so they change no earlier
position; the loss leaves them out (`mtp_targets`). Their tokens do pass the block's router, like every
padded position of a batch.

The blocks live in the model's `layers` under ids n_layers .. n_layers + D - 1 (so tensor, expert and data
parallelism, activation checkpointing and compile treat them as blocks); the rest of each module lives here.
"""

from __future__ import annotations

import torch
from torch import nn

from moeyard.moe.config import ModelConfig


class MTPModule(nn.Module):
    """Module k's own parameters besides its block: the two input norms, the projection and the head's norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.enorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.hnorm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)

    def combine(self, emb_BSD: torch.Tensor, h_BSD: torch.Tensor) -> torch.Tensor:
        """h'^k from the embeddings of t_{i+k} and h^{k-1}: [B, S, D] each -> [B, S, D]."""
        return self.eh_proj(torch.cat([self.enorm(emb_BSD), self.hnorm(h_BSD)], dim=-1))


def mtp_block_ids(cfg: ModelConfig) -> list[str]:
    """The `layers` keys of the MTP modules' blocks, depth 1 first (Hugging Face numbers them the same)."""
    return [str(cfg.n_layers + k) for k in range(cfg.mtp_layers)]


def shifted_tokens(tokens_BS: torch.Tensor, k: int) -> torch.Tensor:
    """t_{i+k} at every position i: the tokens rolled left by k (the last k wrap around; `mtp_targets`
    leaves them out of the loss)."""
    return torch.roll(tokens_BS, -k, dims=1)


def mtp_targets(targets_BS: torch.Tensor, depths: int, doc_ids_BS: torch.Tensor | None, ignore: int) -> torch.Tensor:
    """The targets of every depth: [B, 1 + depths, S], row 0 the main model's (unchanged), row k the token
    t_{i+k+1} module k predicts at position i, `ignore` where it has none: past the sequence's end, or where
    t_{i+k} starts another packed document than position i's (module k would read across the boundary)."""
    rows = [targets_BS]
    S = targets_BS.shape[1]
    for k in range(1, depths + 1):
        shifted = torch.roll(targets_BS, -k, dims=1)
        valid = torch.arange(S, device=targets_BS.device) < S - k
        if doc_ids_BS is not None:
            valid = valid & (torch.roll(doc_ids_BS, -k, dims=1) == doc_ids_BS)
        rows.append(shifted.masked_fill(~valid, ignore))
    return torch.stack(rows, dim=1)
