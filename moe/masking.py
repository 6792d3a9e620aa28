"""Document masking for packed sequences: positions that restart at each document, and a block-causal mask.

A training row is a window cut from a stream of documents, so it holds the tail of one document, whole
documents, and the head of another. With document masking a token attends only to earlier tokens of its own
document, and its rotary position counts from the start of that document (or of the row, for the partial
first one), so a document is seen as if it were trained alone.

Legend: B batch rows, S sequence positions.

The inputs are per-token document ids (`train.data.document_ids`); only where they change matters, so any
labelling of contiguous runs works.
"""

from __future__ import annotations

import torch


def _document_starts(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """bool [B, S]: True where a document begins (every row's first position included)."""
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    return starts_BS


def document_positions(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Each token's offset from the start of its document.

    Args:
        doc_ids_BS: document ids [B, S], any integer dtype.

    Returns:
        int64 [B, S] on the same device, e.g. ids [0 0 0 1 1 2] give [0 1 2 0 1 0].
    """
    S = doc_ids_BS.shape[1]
    idx_S = torch.arange(S, device=doc_ids_BS.device)
    start_BS = torch.where(_document_starts(doc_ids_BS), idx_S, 0).cummax(dim=1).values
    return idx_S - start_BS


def block_causal_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Where attention is allowed: query i sees key j iff j <= i and both lie in the same document.

    The diagonal is always allowed, so no query row is empty (a fully masked row would give NaN).

    Args:
        doc_ids_BS: document ids [B, S], any integer dtype.

    Returns:
        bool [B, 1, S, S] (True = attend), broadcasting over heads: the `attn_mask` of
        `F.scaled_dot_product_attention` (pass it instead of `is_causal=True`).
    """
    S = doc_ids_BS.shape[1]
    segment_BS = _document_starts(doc_ids_BS).cumsum(dim=1)  # runs, not ids: a repeated id stays apart
    same_BSS = segment_BS[:, :, None] == segment_BS[:, None, :]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
    return (same_BSS & causal_SS)[:, None]


def document_attention(doc_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions int64 [B, S] and block-causal mask bool [B, 1, S, S] of a packed batch (see above)."""
    return document_positions(doc_ids_BS), block_causal_mask(doc_ids_BS)
