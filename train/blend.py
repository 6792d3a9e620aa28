"""Blended token data: several `moeyard prepare` directories, sampled in proportion to their weights.

`data=blend 'data.blend=[{path:web,weight:0.7},{path:code,weight:0.3}]'`. Weights are relative (normalised to
sum to 1). Each source keeps its own held-out tail (data.val_fraction of it); eval batches blend those tails
in the same proportions.

Which source a sample comes from is a deterministic schedule, not a random draw per sample. A random draw
would also be a function of (seed, step), but its per-source counts drift from the weights by the binomial
noise (a 1% source in 10^4 samples varies by +-10%), and the tokens a source has contributed so far would be a
sum over every past step. The schedule instead fixes how many of the first n samples each source gets,
`cumulative_counts(n)`, in closed form and exactly on every prefix of the run: within ceil(log2(sources))
samples of n * weight. A step's batch takes the difference of two prefixes, so each step is still a pure
function of (seed, step) and a resumed run draws bitwise the same batches and logs the same counts, with no
state in the checkpoint. Randomness (seeded by (seed, step)) only shuffles the rows, so every data-parallel rank
and micro-batch sees a mix, and picks each row's window inside its source.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch


@dataclass(kw_only=True)
class BlendSource:
    """One source of a blend (`data.blend`): a `moeyard prepare` directory and its share of the samples."""

    path: str
    """Directory of prepared token files."""
    weight: float = 1.0
    """Relative share of the samples (the weights of a blend are normalised to sum to 1)."""


def check_blend(sources: Sequence[BlendSource], source: str) -> None:
    """The blend's own rules (its files are checked by `moeyard.train.data.check_vocab`): ValueError naming the
    field, the value and the rule."""
    if source != "blend":
        if sources:
            raise ValueError(f"data.source={source} must be blend when data.blend is set (rule: choose data=blend)")
        return
    if not sources:
        raise ValueError("data.blend=[] must list sources when data.source=blend (rule: [{path:DIR,weight:W},...])")
    for i, s in enumerate(sources):
        if not s.path:
            raise ValueError(f"data.blend[{i}].path={s.path!r} must name a `moeyard prepare` directory")
        if not (math.isfinite(s.weight) and s.weight > 0):
            raise ValueError(f"data.blend[{i}].weight={s.weight} must be > 0 (rule: drop a source to leave it out)")


def source_names(sources: Sequence[BlendSource]) -> list[str]:
    """Names for metrics: each directory's own name, or its position where two share a name."""
    names = [Path(s.path).name or str(i) for i, s in enumerate(sources)]
    return names if len(set(names)) == len(names) else [f"{i}_{name}" for i, name in enumerate(names)]


def cumulative_counts(n: int, weights: Sequence[Fraction]) -> list[int]:
    """How many of the first `n` samples each source gets; non-decreasing in `n`, summing to `n`.

    The sources are split in two halves, the left half gets floor(n * its weight) and the right half the rest,
    and so on down to single sources. Each split is off by under one sample and passes its error down
    scaled by a ratio <= 1, so every count is within ceil(log2(len(weights))) of n * weight. Exact rational
    arithmetic: a float product could round past an integer and make a count go backwards.
    """
    if len(weights) == 1:
        return [n]
    half = len(weights) // 2
    left = math.floor(n * sum(weights[:half]) / sum(weights))
    return cumulative_counts(left, weights[:half]) + cumulative_counts(n - left, weights[half:])


@dataclass
class BlendData:
    """Token data drawn from several sources; the same interface as `moeyard.train.data.TokenData`.

    `parts` are one TokenData per source, each split into its own train and held-out tails; they share a
    tokenizer (the same separator), the sequence length, the seed and data.document_mask.
    """

    parts: list
    weights: list[Fraction]
    names: list[str]

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, ...]:
        """The global training batch of `step`: inputs and next-token targets, int64 [batch, seq_len]."""
        rng = np.random.default_rng([self.parts[0].seed, step])
        return self._blend([(p.train, p.train_mask) for p in self.parts], step, batch_size, rng)

    def eval_batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, ...]:
        """Held-out batch number `index` (fixed for the whole run), from every source's held-out tail."""
        rng = np.random.default_rng([self.parts[0].seed, 1 << 30, index])
        return self._blend([(p.val, p.val_mask) for p in self.parts], index, batch_size, rng)

    def documents(self, inputs_BS: torch.Tensor) -> torch.Tensor | None:
        """Document ids [B, S] of a batch's inputs with data.document_mask, else None (see TokenData)."""
        return self.parts[0].documents(inputs_BS)

    def source_tokens(self, steps: int, batch_size: int) -> dict[str, int]:
        """Input tokens each source has contributed to the first `steps` training batches."""
        seq_len = self.parts[0].seq_len
        counts = cumulative_counts(steps * batch_size, self.weights)
        return {f"source_tokens/{name}": c * seq_len for name, c in zip(self.names, counts, strict=True)}

    def _blend(self, streams: list[tuple], index: int, batch_size: int, rng: np.random.Generator):
        """Batch `index`'s rows: each source's share of them, windows from its (stream, loss mask), rows
        shuffled."""
        before = cumulative_counts(index * batch_size, self.weights)
        after = cumulative_counts((index + 1) * batch_size, self.weights)
        order = rng.permutation(batch_size)
        drawn = [
            part._sample(stream, rng, hi - lo, mask)
            for part, (stream, mask), lo, hi in zip(self.parts, streams, before, after, strict=True)
            if hi > lo
        ]
        return tuple(torch.cat(rows)[order] for rows in zip(*drawn, strict=True))
