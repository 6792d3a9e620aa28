"""`moeyard prepare` of .parquet files: the same documents as Parquet rows and as JSONL lines give the same
tokens; a file is read one record batch at a time (Arrow's memory stays far below the file); a missing or
non-string column and a null row are one-line errors naming --text-field, and so is a file that is not
Parquet; progress shows tokens/s and the
time left, as plain lines off a terminal and as a rich bar on one.

Run: `.venv/bin/pytest -q tests/unit/test_prepare_parquet.py` (about 15 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import moeyard.interop.prepare as prepare_module
from moeyard.interop.prepare import prepare
from moeyard.launch.cli import main

WORDS = ["the", "quick", "brown", "fox", "über", "naïve", "café", "✓", "def", "return", "\n", "    "]


def documents(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(n))) for n in rng.integers(1, 60, size=count)]


def write_parquet(path: Path, columns: dict[str, list], rows_per_group: int = 100) -> Path:
    """Written a row group at a time, so writing never holds the whole table in Arrow memory."""
    rows = len(next(iter(columns.values())))
    with pq.ParquetWriter(path, pa.table({k: v[:1] for k, v in columns.items()}).schema) as writer:
        for start in range(0, rows, rows_per_group):
            writer.write_table(pa.table({k: v[start : start + rows_per_group] for k, v in columns.items()}))
    return path


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained here on the test's words (no download)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(documents(300, seed=1), trainer)
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    return path


def test_parquet_rows_give_the_tokens_of_the_same_jsonl_lines(bpe, tmp_path):
    docs = documents(2500)  # > PARQUET_ROWS: several record batches, 25 row groups
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    write_parquet(tmp_path / "d.parquet", {"id": list(range(len(docs))), "body": docs})
    from_jsonl = prepare([tmp_path / "d.jsonl"], tmp_path / "j", tokenizer=bpe, text_field="body")
    from_parquet = prepare([tmp_path / "d.parquet"], tmp_path / "p", tokenizer=bpe, text_field="body")
    assert from_parquet["documents"] == from_jsonl["documents"] == len(docs)
    assert from_parquet["num_tokens"] == from_jsonl["num_tokens"] > len(docs)
    assert (tmp_path / "p" / "tokens.bin").read_bytes() == (tmp_path / "j" / "tokens.bin").read_bytes()


def test_parquet_is_read_a_record_batch_at_a_time(tmp_path):
    """9 MB of text (1.5 MB compressed) in 128 KiB batches: Arrow's peak allocation, writing the file included,
    stays under half the compressed file, which reading it whole (or pre-buffering all its pages) would hold."""
    docs = [d * 20 for d in documents(3000, seed=2)]
    write_parquet(tmp_path / "big.parquet", {"text": docs}, rows_per_group=20)  # ~60 KB of text a row group
    del docs
    meta = prepare([tmp_path / "big.parquet"], tmp_path / "out", batch_bytes=128 << 10)
    assert meta["documents"] == 3000 and meta["num_tokens"] > 9e6
    peak, size = pa.default_memory_pool().max_memory(), (tmp_path / "big.parquet").stat().st_size
    assert peak < size / 2, f"Arrow peak {peak / 1e6:.2f} MB for a {size / 1e6:.2f} MB file"


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"body": ["a", "b"]}, "--text-field=text is not a string column (columns: body)"),
        ({"text": [1, 2]}, "--text-field=text is not a string column (columns: text)"),
        ({"text": ["a", None]}, "row 1: --text-field=text is null"),
    ],
)
def test_bad_parquet_column_is_one_line(tmp_path, capsys, columns, message):
    path = write_parquet(tmp_path / "d.parquet", columns)
    assert main(["prepare", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{path}: {message}" in err and "(rule: " in err, err
    assert not (tmp_path / "out" / "tokens.bin").exists()


def test_file_that_is_not_parquet_is_one_line(tmp_path, capsys):
    (tmp_path / "d.parquet").write_text("text, not Parquet")
    assert main(["prepare", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'd.parquet'} is not a Parquet file" in err, err


def test_progress_lines_show_tokens_per_second_and_time_left(tmp_path, monkeypatch, capsys):
    write_parquet(tmp_path / "d.parquet", {"text": documents(400)})
    monkeypatch.setattr(prepare_module, "PROGRESS_EVERY_S", 0.0)
    prepare([tmp_path / "d.parquet"], tmp_path / "out", progress=True, batch_bytes=2 << 10)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("prepare:")]
    assert len(lines) > 3 and all("tokens/s" in ln and "ETA" in ln for ln in lines)
    assert lines[-1].startswith("prepare: 100%")


def test_progress_on_a_terminal_is_a_rich_bar(tmp_path, monkeypatch, capsys):
    write_parquet(tmp_path / "d.parquet", {"text": documents(400)})
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich asks the stream too; this makes it draw
    prepare([tmp_path / "d.parquet"], tmp_path / "out", progress=True, batch_bytes=2 << 10)
    err = capsys.readouterr().err
    assert "prepare" in err and "tokens/s" in err and "ETA" in err and "━" in err
    assert "prepare:" not in err  # no plain lines beside the bar
