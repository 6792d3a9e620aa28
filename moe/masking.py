"""Document masking for packed sequences: positions that restart at each document, and a block-causal mask.

A training row is a window cut from a stream of documents, so it holds the tail of one document, whole
documents, and the head of another. With document masking a token attends only to earlier tokens of its own
document, and its rotary position counts from the start of that document (or of the row, for the partial
first one), so a document is seen as if it were trained alone.

Legend: B batch rows, S sequence positions.

The inputs are per-token document ids (`train.data.document_ids`); only where they change matters, so any
labelling of contiguous runs works.

Two forms of the same mask: a dense bool [B, 1, S, S] for SDPA (`block_causal_mask`), and FlexAttention's
BlockMask (`flex_block_mask`), which stores per 128 x 128 tile whether it is empty, full or partial, so the
kernel skips the empty tiles (most of them with short documents) and never holds an [S, S] tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask


def _document_starts(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """bool [B, S]: True where a document begins (every row's first position included)."""
    starts_BS = torch.ones_like(doc_ids_BS, dtype=torch.bool)
    starts_BS[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    return starts_BS


def _segments(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """int64 [B, S]: the index of each token's run (runs, not ids: a repeated id stays apart)."""
    return _document_starts(doc_ids_BS).cumsum(dim=1)


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
    segment_BS = _segments(doc_ids_BS)
    same_BSS = segment_BS[:, :, None] == segment_BS[:, None, :]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=doc_ids_BS.device).tril()
    return (same_BSS & causal_SS)[:, None]


def context_mask(doc_ids_BS: torch.Tensor | None, positions_Sq: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The rows of the causal (or, with document ids, block-causal) mask for queries at `positions_Sq`, against
    every key of the row: what a rank attends with when it holds only some positions of each row (context
    parallelism) and attends to the whole row's keys.

    Args:
        doc_ids_BS: document ids of the whole rows [B, S], or None for one causal sequence per row.
        positions_Sq: int64 [Sq], the global positions of the queries.
        seq_len: S, the keys' count.

    Returns:
        bool [B or 1, 1, Sq, S] (True = attend), equal to rows `positions_Sq` of `block_causal_mask` (or of the
        causal mask); the diagonal stays allowed.
    """
    keys_S = torch.arange(seq_len, device=positions_Sq.device)
    causal_QS = keys_S[None, :] <= positions_Sq[:, None]
    if doc_ids_BS is None:
        return causal_QS[None, None]
    segment_BS = _segments(doc_ids_BS)
    same_BQS = segment_BS[:, positions_Sq, None] == segment_BS[:, None, :]
    return (same_BQS & causal_QS)[:, None]


def sliding_window_mask(mask: torch.Tensor | None, seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    """`mask` (bool [B, 1, S, S], or None for causal) narrowed to a sliding window: query i also needs
    i - j < `window`, so it sees the last `window` positions, its own included (transformers' sliding_window).

    Returns bool [B or 1, 1, S, S] (True = attend); the diagonal stays allowed."""
    idx_S = torch.arange(seq_len, device=device)
    behind_SS = idx_S[:, None] - idx_S[None, :]
    window_SS = (behind_SS >= 0) & (behind_SS < window)
    return window_SS[None, None] if mask is None else mask & window_SS


def document_attention(doc_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions int64 [B, S] and block-causal mask bool [B, 1, S, S] of a packed batch (see above)."""
    return document_positions(doc_ids_BS), block_causal_mask(doc_ids_BS)


@cache
def _compiled_create_block_mask() -> Callable[..., BlockMask]:
    """create_block_mask compiled once per process (built on first use: importing this module stays cheap)."""
    return torch.compile(create_block_mask, dynamic=False)


def flex_block_mask(
    doc_ids_BS: torch.Tensor | None,
    seq_len: int,
    device: torch.device,
    positions_Sq: torch.Tensor | None = None,
) -> BlockMask:
    """The block-causal mask (or, without document ids, the causal mask) as FlexAttention's BlockMask; with
    `positions_Sq`, only the rows of queries at those global positions (`context_mask`'s BlockMask).

    Built once per micro-batch and shared by every layer; heads broadcast (H=None), and so do rows without
    document ids (B=None). On CUDA create_block_mask runs compiled, which evaluates the mask tile by tile
    (eager, it would first build the dense [B, 1, S, S] bool tensor); elsewhere eagerly, as the CPU tests
    need no speed and compiling would cost them seconds.

    Args:
        doc_ids_BS: document ids [B, S] (any integer dtype), or None for one causal sequence per row.
        seq_len: S.
        device: where the mask lives (that of q, k and v).
        positions_Sq: int64 [Sq] on `device`, the queries' global positions; None: every position of the row.
    """
    rows = None if doc_ids_BS is None else doc_ids_BS.shape[0]
    segment_BS = None if doc_ids_BS is None else _segments(doc_ids_BS)
    # Without positions the query index is its position: the kernel evaluates no extra gather per element.
    pos = (lambda q_idx: q_idx) if positions_Sq is None else (lambda q_idx: positions_Sq[q_idx])

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q_pos = pos(q_idx)
        if segment_BS is None:
            return kv_idx <= q_pos
        return (kv_idx <= q_pos) & (segment_BS[b, q_pos] == segment_BS[b, kv_idx])

    queries = seq_len if positions_Sq is None else len(positions_Sq)
    create = _compiled_create_block_mask() if torch.device(device).type == "cuda" else create_block_mask
    return create(mask_mod, rows, None, queries, seq_len, device=device)
