"""`moeyard prepare`: text, JSONL, Parquet or a directory of them -> a memory-mapped token file and its meta.json.

Offline, in the launching process; ranks read the result with `moeyard.train.data.read_token_dir` and never
import the `tokenizers` library. Every core encodes: `encode_batch` spreads each batch over the `tokenizers`
library's thread pool (one thread per core unless RAYON_NUM_THREADS says otherwise), which runs outside the
Python interpreter lock, so no worker processes (and no copies of the input between them) are needed.
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
PARQUET_SUFFIX = ".parquet"
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


def _parquet_documents(path: Path, text_field: str, batch_bytes: int) -> Iterator[_Piece]:
    """One document per row: the string column `text_field`, read one record batch of about `batch_bytes`
    (by the file's mean row size) at a time, never whole.

    Progress counts the file's bytes shared out evenly over its rows (compressed pages have no per-row size).
    """
    import pyarrow as pa  # here, not at the top: every `moeyard` command imports this module
    import pyarrow.parquet as pq

    try:
        # No pre-buffering: made for high-latency stores, it reads every column chunk ahead, i.e. the whole file.
        parquet = pq.ParquetFile(path, pre_buffer=False)
    except pa.ArrowException as err:
        raise ValueError(f"{path} is not a Parquet file ({err}) (rule: .parquet inputs are Apache Parquet)") from None
    schema = parquet.schema_arrow
    kind = schema.field(text_field).type if text_field in schema.names else None
    if kind is None or not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(
            f"{path}: --text-field={text_field} is not a string column (columns: {', '.join(schema.names)}) "
            "(rule: name the text column with --text-field)"
        )
    meta = parquet.metadata
    rows, size, row = max(meta.num_rows, 1), path.stat().st_size, 0
    row_bytes = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)) / rows  # uncompressed
    for batch in parquet.iter_batches(batch_size=max(1, int(batch_bytes / max(row_bytes, 1))), columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise ValueError(f"{path}: row {row}: --text-field={text_field} is null (rule: every row needs text)")
            yield _Piece(text, True, size * (row + 1) // rows - size * row // rows)  # the shares sum to size
            row += 1


def _documents(path: Path, text_field: str, batch_bytes: int) -> Iterator[_Piece]:
    """The pieces of one input file, by its suffix: JSONL, Parquet, else text."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl_documents(path, text_field)
    if suffix == PARQUET_SUFFIX:
        return _parquet_documents(path, text_field, batch_bytes)
    return _text_pieces(path, -(-batch_bytes // PIECES_PER_BATCH))


def _batches(files: list[Path], text_field: str, batch_bytes: int) -> Iterator[list[_Piece]]:
    """Pieces of all inputs, grouped into batches of about `batch_bytes` input bytes."""
    batch, size = [], 0
    for path in files:
        for piece in _documents(path, text_field, batch_bytes):
            batch.append(piece)
            size += piece.nbytes
            if size >= batch_bytes:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


class _Progress:
    """Progress on stderr: input read, tokens written, tokens/s and the time left. A rich bar on a terminal;
    elsewhere (logs, pipes) a line every few seconds, silent for quick jobs."""

    def __init__(self, total_bytes: int, enabled: bool) -> None:
        self.total, self.enabled = max(total_bytes, 1), enabled
        self.start = self.last = time.monotonic()
        self.bar = _rich_bar(self.total) if enabled and sys.stderr.isatty() else None
        self.task = self.bar.add_task("prepare", total=self.total, info="") if self.bar else None

    def update(self, done_bytes: int, tokens: int) -> None:
        now = time.monotonic()
        rate = tokens / max(now - self.start, 1e-6)
        if self.bar is not None:
            self.bar.update(self.task, completed=done_bytes, info=f"{_count(tokens)} tokens  {_count(rate)} tokens/s")
            return
        if not self.enabled or now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        left = (now - self.start) * (self.total - done_bytes) / max(done_bytes, 1)
        print(
            f"prepare: {100 * done_bytes / self.total:3.0f}%  {done_bytes / 1e6:,.1f}/{self.total / 1e6:,.1f} MB  "
            f"{tokens:,} tokens  {rate:,.0f} tokens/s  ETA {left:,.0f} s",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _count(n: float) -> str:
    """A count in three or four digits and a unit: 1.2M, 35.0k (the bar fits 80 columns)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _rich_bar(total_bytes: int):
    """A started rich progress bar on stderr: share of the input read, tokens so far, tokens/s, time left."""
    from rich.console import Console  # here: only a terminal run draws a bar
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("[bold]prepare"),
        BarColumn(bar_width=20),
        TaskProgressColumn(),
        TextColumn("{task.fields[info]}  ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    bar.start()
    return bar


def _write_tokens(
    files: list[Path], tok: Tokenizer, text_field: str, dtype: type, fh: BinaryIO, batch_bytes: int, progress: bool
) -> tuple[int, int]:
    """Encodes the inputs batch by batch, appending each batch's tokens to `fh`; returns (tokens, documents)."""
    meter = _Progress(sum(f.stat().st_size for f in files), progress)
    eos = np.array([tok.eos_id], dtype=dtype)
    tokens = documents = done = 0
    try:
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
    finally:
        meter.close()
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
    `text_field`), a .parquet file one per row (its string column `text_field`). Every document is followed
    by the tokenizer's end-of-text token. Tokens are uint16 when the vocabulary fits, else uint32.

    Args:
        paths: text/JSONL/Parquet files or directories (their visible files, sorted by path).
        out_dir: output directory, created if needed.
        tokenizer: a tokenizer.json or a directory with one; None for bytes.
        eos_token: the separator, overriding the tokenizer's own (needs `tokenizer`).
        text_field: the JSONL field or Parquet column holding the text.
        progress: show progress on stderr (a bar on a terminal, else a line every few seconds).
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
