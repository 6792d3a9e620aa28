"""Token data: the embedded standard-library corpus, prepared memory-mapped token files, batch sampling.

Default tokenizer: bytes (vocabulary 256, document separator 0, which never occurs in text files). It needs
no training or download and is identical on every machine. `moeyard prepare --tokenizer PATH` instead uses a
Hugging Face `tokenizer.json` (local, no download) and separates documents with its end-of-text token.

Batches are a pure function of (seed, step): every rank draws the same global batch and takes its own rows.
So the data position is the step number, a resumed run sees exactly the batches it would have seen, and
every parallel layout sees the same tokens as one process. Document ids (data.document_mask) are a function
of a batch's input tokens alone, so each rank derives them from its own rows.
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from moeyard.moe.config import check_fields, choice, require
from moeyard.train.blend import BlendData, BlendSource, check_blend, source_names

EOS = 0
TOKENIZER = "bytes"
LARGEST_BYTE = 255
"""The largest id of the byte tokenizer (the stdlib corpus): what the vocabulary must exceed."""
LOSS_MASK_FILE = "loss_mask.bin"
"""Beside tokens.bin (`moeyard prepare --chat`): one uint8 per token, 1 where the token is a target the loss counts."""
IGNORE = -100
"""A target the loss skips (torch's cross-entropy ignore_index): where the loss mask is 0."""


@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from."""

    source: str = choice("stdlib", "tokens", "blend")
    """stdlib: the Python standard library's source files (on every machine); tokens: `moeyard prepare` output;
    blend: several `moeyard prepare` outputs in proportion (data.blend, train/blend.py)."""
    path: str | None = None
    """Directory of prepared token files (source=tokens)."""
    val_fraction: float = 0.05
    """Tail fraction of the token stream held out for eval."""
    max_files: int = 400
    """stdlib: how many source files to read (sorted by path, so the corpus is the same everywhere)."""
    document_mask: bool = False
    """Keep packed documents apart: attention stays inside a document and positions restart at its start."""
    loss_mask: bool = True
    """Count only the targets the directory's loss mask marks (`moeyard prepare --chat`: assistant tokens),
    where it has one; false: every token."""
    blend: list[BlendSource] = field(default_factory=list)
    """source=blend: [{path: DIR, weight: W}, ...], prepared directories sampled in proportion to W."""

    def check(self) -> None:
        """Raises ValueError naming the first field whose value breaks a rule (the files: `check_vocab`)."""
        check_fields(self, "data.")
        require(0 < self.val_fraction < 1, "data.val_fraction", self.val_fraction, "must be in (0, 1)")
        require(self.max_files >= 1, "data.max_files", self.max_files, "must be >= 1")
        rule = "must name a `moeyard prepare` directory when data.source=tokens"
        require(self.source != "tokens" or bool(self.path), "data.path", self.path, rule)
        check_blend(self.blend, self.source)


def check_vocab(cfg: DataConfig, vocab_size: int, seq_len: int) -> None:
    """Opens the configured data as a rank would and checks that its token ids fit a vocabulary of
    `vocab_size` and that every stream holds `seq_len` windows: ValueError naming the field. The launcher
    calls it once, before any rank starts."""
    if cfg.source == "stdlib":
        check_token_ids(LARGEST_BYTE, "data.source=stdlib", vocab_size)
    else:  # prepared directories are only memory-mapped: cheap
        build_data(cfg, seq_len, 0, vocab_size)


def check_token_ids(largest: int, source: str, vocab_size: int) -> None:
    """Token ids index rows of the embedding: an id at or past `vocab_size` would fail inside a rank."""
    rule = f"(rule: token ids must fit the embedding; set model.vocab_size>={largest + 1})"
    require(
        largest < vocab_size,
        "model.vocab_size",
        vocab_size,
        f"must exceed the largest token id {largest} of {source} {rule}",
    )


def encode(text: str) -> np.ndarray:
    """Byte-level tokens of `text` (uint8 values as int64-compatible array)."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode(tokens: Iterable[int]) -> str:
    return bytes(int(t) for t in tokens if t != EOS).decode("utf-8", errors="replace")


def stdlib_files(max_files: int) -> list[Path]:
    """The first `max_files` .py files of this Python's standard library, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "idlelib", "lib2to3")
    files = sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts))
    return files[:max_files]


def tokenize_files(paths: Iterable[Path]) -> np.ndarray:
    """Concatenated byte tokens of text files, each followed by the separator."""
    chunks = []
    for path in paths:
        chunks.append(encode(path.read_text(encoding="utf-8", errors="replace")))
        chunks.append(np.array([EOS], dtype=np.uint8))
    return np.concatenate(chunks).astype(np.uint16) if chunks else np.zeros(0, dtype=np.uint16)


def read_token_dir(path: str | Path, vocab_size: int, key: str = "data.path") -> tuple[np.ndarray, dict]:
    """Memory-maps a prepared token directory and returns it with its metadata, checked against the model
    (errors name `key`, the config field that gave `path`)."""
    path = Path(path)
    meta_path, bin_path = path / "meta.json", path / "tokens.bin"
    if not meta_path.is_file() or not bin_path.is_file():
        raise ValueError(f"{key}={path} lacks meta.json or tokens.bin (rule: run `moeyard prepare` first)")
    try:
        meta = json.loads(meta_path.read_text())
        dtype, num_tokens = np.dtype(meta["dtype"]), int(meta["num_tokens"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{key}={path}: meta.json is corrupt ({err}) (rule: rerun `moeyard prepare`)") from None
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"{key}={path}: dtype={dtype} (rule: token files are uint16 or uint32)")
    if bin_path.stat().st_size != num_tokens * dtype.itemsize:
        raise ValueError(
            f"{key}={path}: tokens.bin has {bin_path.stat().st_size} bytes, meta.json promises "
            f"{num_tokens} x {dtype.itemsize} (rule: the file must be complete)"
        )
    if num_tokens == 0:  # nothing to sample (and an empty file cannot be memory-mapped)
        raise ValueError(f"{key}={path} holds no tokens (rule: prepare it from non-empty input)")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,))
    if "vocab_size" not in meta:  # written by hand or by an old `moeyard prepare`: the ids themselves tell
        largest = int(tokens.max()) if num_tokens else 0
        check_token_ids(largest, f"{key}={path} (meta.json records no vocab_size)", vocab_size)
    vocab = int(meta.get("vocab_size", 0))
    if vocab > vocab_size:
        raise ValueError(
            f"{key}={path}: vocab_size={vocab} of tokenizer {meta.get('tokenizer', TOKENIZER)} exceeds "
            f"model.vocab_size={vocab_size} (rule: token ids must fit the embedding; set model.vocab_size>={vocab})"
        )
    return tokens, meta


def load_token_dir(path: str | Path, vocab_size: int) -> np.ndarray:
    """The memory-mapped tokens of a prepared directory, checked against the model (see `read_token_dir`)."""
    return read_token_dir(path, vocab_size)[0]


def with_loss_mask(data: TokenData, path: str | Path, meta: dict, use: bool) -> TokenData:
    """`data` of the prepared directory `path` with its loss mask (`moeyard prepare --chat`) split alike, where
    it has one and `use` (data.loss_mask); its chat rows must fit train.seq_len (`check_rows_fit`)."""
    check_rows_fit(meta, path, data.seq_len)
    if not use or "loss_mask" not in meta:
        return data
    file, n = Path(path) / meta["loss_mask"], int(meta["num_tokens"])
    if not file.is_file() or file.stat().st_size != n:
        raise ValueError(
            f"data.path={path}: {meta['loss_mask']} is missing or not one byte per token "
            "(rule: rerun `moeyard prepare --chat`, or train on every token with data.loss_mask=false)"
        )
    mask = np.memmap(file, dtype=np.uint8, mode="r", shape=(n,))
    return replace(data, train_mask=mask[: len(data.train)], val_mask=mask[len(data.train) :])


def check_rows_fit(meta: dict, path: str | Path, seq_len: int) -> None:
    """Chat rows (`moeyard prepare --chat`) must fit train.seq_len, or a row's last turns would always be
    trained with part of its conversation out of view; prepare cuts or refuses longer rows (--seq-len)."""
    longest = meta.get("longest_row")
    if longest is not None and longest > seq_len:
        raise ValueError(
            f"train.seq_len={seq_len} is shorter than the longest chat row ({longest} tokens) of data.path={path} "
            f"(rule: rows must fit; prepare again with --seq-len {seq_len} and --long-rows cut or refuse)"
        )


def document_ids(tokens_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Which document of its row each token belongs to: the count of end-of-text tokens before it.

    An end-of-text token closes the document it ends (as in Megatron's reset_attention_mask), so the next
    document starts right after it. A row usually starts inside a document; that partial one is document 0.

    Args:
        tokens_BS: token ids [B, S], any integer dtype.
        eos_id: the separator.

    Returns:
        int64 [B, S], non-decreasing along each row.
    """
    eos_BS = (tokens_BS == eos_id).long()
    return eos_BS.cumsum(dim=1) - eos_BS


@dataclass
class TokenData:
    """A token stream split into train and held-out parts, sampled by (seed, step)."""

    train: np.ndarray
    val: np.ndarray
    seq_len: int
    seed: int
    eos_id: int = EOS
    document_mask: bool = False
    train_mask: np.ndarray | None = None
    """uint8 per token of `train` (data.loss_mask): targets where it is 0 read IGNORE."""
    val_mask: np.ndarray | None = None

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global training batch of `step`: inputs and next-token targets, int64 [batch, seq_len]
        (targets the loss mask leaves out are IGNORE)."""
        return self._sample(self.train, np.random.default_rng([self.seed, step]), batch_size, self.train_mask)

    def eval_batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out batch number `index` (fixed for the whole run)."""
        rng = np.random.default_rng([self.seed, 1 << 30, index])
        return self._sample(self.val, rng, batch_size, self.val_mask)

    def source_tokens(self, steps: int, batch_size: int) -> dict[str, int]:
        """Per-source token counts for the metrics: none, with one source (see BlendData)."""
        return {}

    def documents(self, inputs_BS: torch.Tensor) -> torch.Tensor | None:
        """Document ids [B, S] int64 of (any rows of) a batch's inputs with data.document_mask, else None.

        Feed them to `moe.masking.document_attention` for positions and the block-causal mask.
        """
        return document_ids(inputs_BS, self.eos_id) if self.document_mask else None

    def _sample(self, stream: np.ndarray, rng: np.random.Generator, batch_size: int, mask: np.ndarray | None = None):
        starts = rng.integers(0, len(stream) - self.seq_len - 1, size=batch_size)
        rows = np.stack([np.asarray(stream[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        rows_t = torch.from_numpy(rows)
        targets = rows_t[:, 1:].contiguous()
        if mask is not None:
            counted = torch.from_numpy(np.stack([np.asarray(mask[s + 1 : s + self.seq_len + 1]) for s in starts]))
            targets.masked_fill_(counted == 0, IGNORE)
        return rows_t[:, :-1].contiguous(), targets


def build_data(cfg: DataConfig, seq_len: int, seed: int, vocab_size: int) -> TokenData | BlendData:
    """Loads the configured token stream and splits off the held-out tail (each source's, for a blend)."""
    if cfg.source == "blend":
        parts = []
        for i, (s, (tokens, meta)) in enumerate(zip(cfg.blend, read_blend(cfg.blend, vocab_size), strict=True)):
            part = split_data(tokens, meta, cfg, seq_len, seed, f"data.blend[{i}].path={s.path}")
            parts.append(with_loss_mask(part, s.path, meta, cfg.loss_mask))
        return BlendData(parts, [Fraction(s.weight) for s in cfg.blend], source_names(cfg.blend))
    if cfg.source == "stdlib":
        check_token_ids(LARGEST_BYTE, "data.source=stdlib", vocab_size)
        return split_data(tokenize_files(stdlib_files(cfg.max_files)), {}, cfg, seq_len, seed, "data")
    tokens, meta = read_token_dir(cfg.path, vocab_size)
    return with_loss_mask(split_data(tokens, meta, cfg, seq_len, seed, "data"), cfg.path, meta, cfg.loss_mask)


def split_data(tokens: np.ndarray, meta: dict, cfg: DataConfig, seq_len: int, seed: int, what: str) -> TokenData:
    """One token stream with its held-out tail split off; `what` names it in errors."""
    n_val = max(int(len(tokens) * cfg.val_fraction), seq_len + 2)
    if len(tokens) - n_val < seq_len + 2:
        raise ValueError(
            f"{what}: {len(tokens)} tokens cannot hold train.seq_len={seq_len} plus a held-out split "
            f"(rule: need at least {2 * (seq_len + 2)} tokens)"
        )
    return TokenData(
        train=tokens[:-n_val],
        val=tokens[-n_val:],
        seq_len=seq_len,
        seed=seed,
        eos_id=int(meta.get("eos_id", EOS)),  # bytes: stdlib, and directories written before eos_id was recorded
        document_mask=cfg.document_mask,
    )


def read_blend(sources: list[BlendSource], vocab_size: int) -> list[tuple[np.ndarray, dict]]:
    """Every source of a blend, read and checked as `read_token_dir` does; they must share one tokenizer."""
    read = [read_token_dir(s.path, vocab_size, f"data.blend[{i}].path") for i, s in enumerate(sources)]
    first = _tokenizer_of(read[0][1])
    for i, (_, meta) in enumerate(read[1:], 1):
        require(
            _tokenizer_of(meta) == first,
            f"data.blend[{i}].path",
            sources[i].path,
            f"was prepared with tokenizer {_tokenizer_of(meta)}, data.blend[0] with {first} "
            "(rule: the sources of a blend share one tokenizer and separator)",
        )
    return read


def _tokenizer_of(meta: dict) -> str:
    """What makes two token directories compatible: the tokenizer (its file's hash when recorded) and separator."""
    sha = meta.get("tokenizer_sha256")
    return f"{meta.get('tokenizer', TOKENIZER)}{f' sha256={sha[:12]}' if sha else ''} eos_id={meta.get('eos_id', EOS)}"


def pins_memory(device: torch.device) -> bool:
    """Whether batches bound for `device` are staged in pinned host memory: only for CUDA (torch can pin
    only with an accelerator present, and a CPU "copy" moves nothing)."""
    return device.type == "cuda"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device` without making the host wait for it.

    A copy from pageable memory makes CUDA wait for the stream before staging it (the host blocks until the
    device has finished all queued work), and so does any copy without non_blocking. From pinned memory a
    non_blocking copy is only queued; torch's pinned-memory cache keeps the buffer until the copy is done.
    """
    if pins_memory(device):
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class Prefetcher:
    """Hands out step N's batch on the device, and prepares step N+1's while step N runs.

    `prefetch(n + 1)` is called once step N's work is queued: the host samples, pins and queues the copy of
    the next batch while the device still computes step N (the host runs ahead of the device, since steps
    between logging steps never read from it). No thread: the sampling is short, and a thread would compete
    with the launching thread for the interpreter lock.
    """

    def __init__(self, host_batch: Callable[[int], tuple[torch.Tensor, ...]], device: torch.device) -> None:
        """`host_batch(step)`: this rank's rows of step's batch, on the host."""
        self.host_batch = host_batch
        self.device = device
        self._next: tuple[int, tuple[torch.Tensor, ...]] | None = None

    def prefetch(self, step: int) -> None:
        self._next = (step, self._transfer(step))

    def get(self, step: int) -> tuple[torch.Tensor, ...]:
        """Step's batch on the device (the prefetched one, or transferred now after a resume or a skip)."""
        ready, self._next = self._next, None
        return ready[1] if ready is not None and ready[0] == step else self._transfer(step)

    def _transfer(self, step: int) -> tuple[torch.Tensor, ...]:
        return tuple(to_device(t, self.device) for t in self.host_batch(step))
