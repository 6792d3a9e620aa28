"""`moeyard eval`: a checkpoint's mean loss and perplexity on held-out token windows, in one process.

The windows are the trainer's own held-out batches (`TokenData.eval_batch`: the run's seed, batch size and
sequence length), and each batch's loss is computed as the trainer's evaluation computes it (`lm_loss` per
micro-batch, under a loss mask scaled by `loss_scale`, then the mean over micro-batches), so on the run's own
data the result is the run's logged `eval_loss` at the checkpoint's step. Perplexity is exp(mean loss).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from moeyard.moe.model import Transformer
from moeyard.train.blend import BlendData
from moeyard.train.config import TrainConfig
from moeyard.train.data import EOS, DataConfig, TokenData, build_data, read_token_dir, split_data, with_loss_mask
from moeyard.train.trainer import lm_loss, loss_scale

SPLITS = ("val", "all")


def held_out(data: DataConfig, path: str | None, split: str, t: TrainConfig, vocab_size: int) -> TokenData | BlendData:
    """The held-out stream: the run's own data (`path` None), or the token directory `path`, whose tail
    data.val_fraction holds out (split=val, as training splits it) or all of whose tokens are held out (all).
    """
    if split not in SPLITS:
        raise ValueError(f"--split={split} must be one of {', '.join(SPLITS)}")
    if path is None:
        if split == "all":
            raise ValueError("--split=all needs --data DIR (rule: the run's own data was partly trained on)")
        return build_data(data, t.seq_len, t.seed, vocab_size)
    cfg = replace(data, source="tokens", path=path, blend=[])
    tokens, meta = read_token_dir(path, vocab_size, "--data")
    if split == "val":
        part = split_data(tokens, meta, cfg, t.seq_len, t.seed, f"--data={path}")
    elif len(tokens) < t.seq_len + 2:
        raise ValueError(f"--data={path}: {len(tokens)} tokens (rule: at least train.seq_len + 2 = {t.seq_len + 2})")
    else:  # every token held out: an empty training part, the whole stream (and its loss mask) held out
        eos_id = int(meta.get("eos_id", EOS))
        part = TokenData(tokens[:0], tokens, t.seq_len, t.seed, eos_id=eos_id, document_mask=cfg.document_mask)
    return with_loss_mask(part, path, meta, cfg.loss_mask)


@torch.no_grad()
def batch_loss(model: Transformer, data: TokenData | BlendData, x: torch.Tensor, y: torch.Tensor, m: int) -> float:
    """One held-out batch's loss as one process's trainer computes it (`Trainer._eval_loss`)."""
    scale = loss_scale(y, m, 1)
    doc = data.documents(x)
    docs = doc.chunk(m) if doc is not None else [None] * m
    device = next(model.parameters()).device
    losses = []
    for xm, ym, dm in zip(x.chunk(m), y.chunk(m), docs, strict=True):
        logits = model(xm.to(device), doc_ids=None if dm is None else dm.to(device))
        losses.append(lm_loss(logits, ym.to(device), None if scale is None else scale.to(device)))
    for moe in model.moe_layers().values():
        moe.drain_stats()
    return float(torch.stack(losses).double().mean())


def evaluate(model: Transformer, data: TokenData | BlendData, t: TrainConfig, batches: int) -> dict[str, float]:
    """Mean loss over held-out batches 0..batches-1 (those the trainer evaluates) and its perplexity."""
    if batches < 1:
        raise ValueError(f"--batches={batches} must be >= 1")
    losses = [batch_loss(model, data, *data.eval_batch(i, t.batch_size), t.micro_batches) for i in range(batches)]
    loss = float(np.mean(losses))
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "batches": batches,
        "tokens": batches * t.batch_size * t.seq_len,
    }
