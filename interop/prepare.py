"""`moeyard prepare`: text, JSONL or a directory of them -> a memory-mapped token file and its meta.json.

Offline, in the launching process; ranks read the result with `moeyard.train.data.read_token_dir` and never
import the `tokenizers` library.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tokenizers

from moeyard.train.data import EOS, TOKENIZER, encode

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
