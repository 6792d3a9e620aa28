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

import codecs
import hashlib
import io
import json
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tokenizers
import torch

from moe.config import choice

EOS = 0
TOKENIZER = "bytes"
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
"""End-of-text tokens tried in order when tokenizer_config.json names none."""
JSONL_SUFFIXES = (".jsonl", ".json")
BATCH_BYTES = 4 << 20
"""Input bytes encoded per `encode_batch` call: big enough to keep the tokenizer's threads busy, small enough
that memory stays flat however large the input."""
PIECES_PER_BATCH = 16
"""A large text file is cut into this many pieces per batch, so `encode_batch` can spread it over threads."""
PROGRESS_EVERY_S = 2.0
"""Seconds between `prepare` progress lines on stderr."""


@dataclass(kw_only=True)
class DataConfig:
    """Where tokens come from."""

    source: str = choice("stdlib", "tokens")
    """stdlib: the Python standard library's source files (on every machine); tokens: `moeyard prepare` output."""
    path: str | None = None
    """Directory of prepared token files (source=tokens)."""
    val_fraction: float = 0.05
    """Tail fraction of the token stream held out for eval."""
    max_files: int = 400
    """stdlib: how many source files to read (sorted by path, so the corpus is the same everywhere)."""
    document_mask: bool = False
    """Keep packed documents apart: attention stays inside a document and positions restart at its start."""


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


@dataclass(frozen=True)
class Tokenizer:
    """What `prepare` needs of a tokenizer: a batch encoder, the vocabulary size and the separator."""

    encode_batch: Callable[[list[str]], list[np.ndarray]]
    vocab_size: int
    eos_id: int
    eos_token: str
    identity: dict = field(default_factory=dict)
    """Metadata that names this exact tokenizer (name, path, sha256 of tokenizer.json)."""


BYTES = Tokenizer(
    encode_batch=lambda texts: [encode(t) for t in texts],
    vocab_size=256,
    eos_id=EOS,
    eos_token="\0",
    identity={"tokenizer": TOKENIZER},
)


def load_tokenizer(path: Path, eos_token: str | None = None) -> Tokenizer:
    """A Hugging Face tokenizer from a tokenizer.json file or a directory holding one (read locally).

    Raises:
        ValueError: naming --tokenizer or --eos-token, the value and the rule, when the file is missing or
            unreadable or no end-of-text token can be found.
    """
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        rule = "give a local tokenizer.json or a directory holding one; nothing is downloaded"
        raise ValueError(f"--tokenizer={path} is not a tokenizer.json or a directory with one (rule: {rule})")
    try:
        hf = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        rule = "a Hugging Face `tokenizers` tokenizer.json"
        raise ValueError(f"--tokenizer={file} cannot be read ({detail}) (rule: {rule})") from None
    # A saved truncation (BERT-style files keep max_length=512) would silently cut documents.
    hf.no_truncation()
    hf.no_padding()
    vocab = hf.get_vocab(with_added_tokens=True)
    eos = _find_eos(vocab, file.parent, eos_token, path)
    name = file.parent.name if file.name == "tokenizer.json" else file.name
    return Tokenizer(
        # Separators are ours to place: no BOS/EOS from the tokenizer's post-processor.
        encode_batch=lambda texts: [
            np.asarray(e.ids, dtype=np.uint32) for e in hf.encode_batch_fast(texts, add_special_tokens=False)
        ],
        vocab_size=max(vocab.values()) + 1,  # ids, not entries: added tokens may leave gaps
        eos_id=vocab[eos],
        eos_token=eos,
        identity={
            "tokenizer": name,
            "tokenizer_path": str(file.resolve()),
            "tokenizer_sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
        },
    )


def _find_eos(vocab: dict[str, int], folder: Path, given: str | None, path: Path) -> str:
    """The document separator: --eos-token, else tokenizer_config.json's eos_token, else a common name."""
    if given is not None:
        if given not in vocab:
            raise ValueError(f"--eos-token={given!r} is not in the vocabulary of {path} (rule: name one of its tokens)")
        return given
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (ValueError, AttributeError):
            raise ValueError(f"{config} is not a JSON object (rule: fix it or give --eos-token)") from None
        eos = eos.get("content") if isinstance(eos, dict) else eos  # older files store an AddedToken dict
        if eos is not None:
            if eos not in vocab:
                raise ValueError(f"{config}: eos_token={eos!r} is not in the vocabulary (rule: give --eos-token)")
            return eos
    found = next((name for name in EOS_NAMES if name in vocab), None)
    if found is None:
        raise ValueError(
            f"--tokenizer={path} has no end-of-text token (rule: tokenizer_config.json's eos_token, else the "
            f"first of {' '.join(EOS_NAMES)} in the vocabulary; or give --eos-token)"
        )
    return found


def _visible_files(root: Path) -> list[Path]:
    """Files under `root`, sorted, skipping hidden files and directories (.git, .venv, editor state)."""
    return sorted(f for f in root.rglob("*") if not any(part.startswith(".") for part in f.relative_to(root).parts))


@dataclass(frozen=True)
class _Piece:
    """Text to encode, whether a separator follows it, and the input bytes it came from (for progress)."""

    text: str
    ends_document: bool
    nbytes: int


def _text_pieces(path: Path, piece_bytes: int) -> Iterator[_Piece]:
    """A text file as one document, read in pieces of whole lines so memory stays flat.

    Decoding matches `Path.read_text(errors="replace")` (universal newlines) even where a piece boundary
    splits a character or a \\r\\n. A token cannot span two pieces, so pieces end at line breaks, where common
    pre-tokenizers split anyway (a line longer than `piece_bytes` is the exception).
    """
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(errors="replace"), translate=True)
    with open(path, "rb") as fh:
        chunk = fh.read(piece_bytes)
        while True:
            chunk += fh.readline(piece_bytes)
            following = fh.read(piece_bytes)
            yield _Piece(decoder.decode(chunk, final=not following), not following, len(chunk))
            if not following:
                return
            chunk = following


def _jsonl_documents(path: Path, text_field: str) -> Iterator[_Piece]:
    """One document per non-blank line: the string at `text_field` of a JSON object."""
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                rule = ".jsonl/.json inputs hold one JSON object per line"
                raise ValueError(f"{path}:{lineno} is not JSON (rule: {rule})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{lineno}: --text-field={text_field} is not a string field of this line "
                    "(rule: every JSONL line needs it; name the field with --text-field)"
                )
            yield _Piece(text, True, len(line))


def _batches(files: list[Path], text_field: str, batch_bytes: int) -> Iterator[list[_Piece]]:
    """Pieces of all inputs, grouped into batches of about `batch_bytes` input bytes."""
    batch, size, piece_bytes = [], 0, -(-batch_bytes // PIECES_PER_BATCH)
    for path in files:
        jsonl = path.suffix.lower() in JSONL_SUFFIXES
        for piece in _jsonl_documents(path, text_field) if jsonl else _text_pieces(path, piece_bytes):
            batch.append(piece)
            size += piece.nbytes
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


class _Progress:
    """A line on stderr every few seconds: input read, tokens written, speed. Silent for quick jobs."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total, self.enabled = max(total_bytes, 1), enabled
        self.start = self.last = time.monotonic()

    def update(self, done_bytes: int, tokens: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        mb, rate = done_bytes / 1e6, done_bytes / 1e6 / max(now - self.start, 1e-6)
        print(
            f"prepare: {100 * done_bytes / self.total:3.0f}%  {mb:,.1f}/{self.total / 1e6:,.1f} MB  "
            f"{tokens:,} tokens  {rate:,.1f} MB/s",
            file=sys.stderr,
            flush=True,
        )


def _write_tokens(
    files: list[Path], tok: Tokenizer, text_field: str, dtype: type, fh: BinaryIO, batch_bytes: int, progress: bool
) -> tuple[int, int]:
    """Encodes the inputs batch by batch, appending each batch's tokens to `fh`; returns (tokens, documents)."""
    meter = _Progress(sum(f.stat().st_size for f in files), progress)
    eos = np.array([tok.eos_id], dtype=dtype)
    tokens = documents = done = 0
    for batch in _batches(files, text_field, batch_bytes):
        parts = []
        for piece, ids in zip(batch, tok.encode_batch([p.text for p in batch]), strict=True):
            parts.append(ids.astype(dtype, copy=False))
            if piece.ends_document:
                parts.append(eos)
        out = np.concatenate(parts)
        out.tofile(fh)
        tokens += out.size
        documents += sum(p.ends_document for p in batch)
        done += sum(p.nbytes for p in batch)
        meter.update(done, tokens)
    return tokens, documents


def prepare(
    paths: list[Path],
    out_dir: Path,
    tokenizer: Path | None = None,
    eos_token: str | None = None,
    text_field: str = "text",
    progress: bool = False,
    batch_bytes: int = BATCH_BYTES,
) -> dict:
    """Tokenizes inputs into OUT/tokens.bin and OUT/meta.json, streaming batch by batch; writes atomically.

    A text file is one document; a .jsonl/.json file holds one document per line (the string at
    `text_field`). Every document is followed by the tokenizer's end-of-text token. Tokens are uint16 when
    the vocabulary fits, else uint32.

    Args:
        paths: text/JSONL files or directories (their visible files, sorted by path).
        out_dir: output directory, created if needed.
        tokenizer: a tokenizer.json or a directory with one; None for bytes.
        eos_token: the separator, overriding the tokenizer's own (needs `tokenizer`).
        text_field: the JSONL field holding the text.
        progress: print a progress line on stderr every few seconds.
        batch_bytes: input bytes encoded per batch; memory use scales with it, not with the input.

    Returns:
        The metadata written to meta.json.
    """
    files = [f for p in paths for f in (_visible_files(p) if p.is_dir() else [p]) if f.is_file()]
    if not files:
        raise ValueError(f"prepare: no files under {[str(p) for p in paths]} (rule: give text files or dirs)")
    if tokenizer is None and eos_token is not None:
        raise ValueError(f"--eos-token={eos_token!r} needs --tokenizer (rule: the byte tokenizer's separator is 0)")
    tok = BYTES if tokenizer is None else load_tokenizer(Path(tokenizer), eos_token)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokens.bin.tmp"
    try:
        with open(tmp, "wb") as fh:
            num_tokens, documents = _write_tokens(files, tok, text_field, dtype, fh, batch_bytes, progress)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    meta = {
        "dtype": np.dtype(dtype).name,
        "num_tokens": num_tokens,
        "vocab_size": tok.vocab_size,
        **tok.identity,
        "eos_id": tok.eos_id,
        "eos_token": tok.eos_token,
        "files": len(files),
        "documents": documents,
        "text_field": text_field,
    }
    tmp.replace(out_dir / "tokens.bin")
    (out_dir / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    (out_dir / "meta.json.tmp").replace(out_dir / "meta.json")
    return meta


def read_token_dir(path: str | Path, vocab_size: int) -> tuple[np.ndarray, dict]:
    """Memory-maps a prepared token directory and returns it with its metadata, checked against the model."""
    path = Path(path)
    meta_path, bin_path = path / "meta.json", path / "tokens.bin"
    if not meta_path.is_file() or not bin_path.is_file():
        raise ValueError(f"data.path={path} lacks meta.json or tokens.bin (rule: run `moeyard prepare` first)")
    try:
        meta = json.loads(meta_path.read_text())
        dtype, num_tokens = np.dtype(meta["dtype"]), int(meta["num_tokens"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"data.path={path}: meta.json is corrupt ({err}) (rule: rerun `moeyard prepare`)") from None
    if dtype not in (np.uint16, np.uint32):
        raise ValueError(f"data.path={path}: dtype={dtype} (rule: token files are uint16 or uint32)")
    if bin_path.stat().st_size != num_tokens * dtype.itemsize:
        raise ValueError(
            f"data.path={path}: tokens.bin has {bin_path.stat().st_size} bytes, meta.json promises "
            f"{num_tokens} x {dtype.itemsize} (rule: the file must be complete)"
        )
    vocab = int(meta.get("vocab_size", 0))
    if vocab > vocab_size:
        raise ValueError(
            f"data.path={path}: vocab_size={vocab} of tokenizer {meta.get('tokenizer', TOKENIZER)} exceeds "
            f"model.vocab_size={vocab_size} (rule: token ids must fit the embedding; set model.vocab_size>={vocab})"
        )
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(num_tokens,)), meta


def load_token_dir(path: str | Path, vocab_size: int) -> np.ndarray:
    """The memory-mapped tokens of a prepared directory, checked against the model (see `read_token_dir`)."""
    return read_token_dir(path, vocab_size)[0]


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

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global training batch of `step`: inputs and next-token targets, int64 [batch, seq_len]."""
        return self._sample(self.train, np.random.default_rng([self.seed, step]), batch_size)

    def eval_batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out batch number `index` (fixed for the whole run)."""
        return self._sample(self.val, np.random.default_rng([self.seed, 1 << 30, index]), batch_size)

    def documents(self, inputs_BS: torch.Tensor) -> torch.Tensor | None:
        """Document ids [B, S] int64 of (any rows of) a batch's inputs with data.document_mask, else None.

        Feed them to `moe.masking.document_attention` for positions and the block-causal mask.
        """
        return document_ids(inputs_BS, self.eos_id) if self.document_mask else None

    def _sample(self, stream: np.ndarray, rng: np.random.Generator, batch_size: int):
        starts = rng.integers(0, len(stream) - self.seq_len - 1, size=batch_size)
        rows = np.stack([np.asarray(stream[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1].contiguous(), rows_t[:, 1:].contiguous()


def build_data(cfg: DataConfig, seq_len: int, seed: int, vocab_size: int) -> TokenData:
    """Loads the configured token stream and splits off the held-out tail."""
    if cfg.source == "stdlib":
        tokens, eos_id = tokenize_files(stdlib_files(cfg.max_files)), EOS
    else:
        tokens, meta = read_token_dir(cfg.path, vocab_size)
        eos_id = int(meta.get("eos_id", EOS))  # directories written before eos_id was recorded are bytes
    n_val = max(int(len(tokens) * cfg.val_fraction), seq_len + 2)
    if len(tokens) - n_val < seq_len + 2:
        raise ValueError(
            f"data: {len(tokens)} tokens cannot hold train.seq_len={seq_len} plus a held-out split "
            f"(rule: need at least {2 * (seq_len + 2)} tokens)"
        )
    return TokenData(
        train=tokens[:-n_val],
        val=tokens[-n_val:],
        seq_len=seq_len,
        seed=seed,
        eos_id=eos_id,
        document_mask=cfg.document_mask,
    )
