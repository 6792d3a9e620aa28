"""Tokens/s of `moeyard prepare` against a plain `tokenizers` batch-encoding loop, on the same input.

Generates a deterministic JSONL corpus (Zipf-distributed pseudo-words, documents of 100 to 800 words; `--mb`
of it, 200 by default) and trains a byte-level BPE tokenizer (at most 8,192 ids) on its first documents.
Then, in one run: the baseline reads the JSONL, parses each line and calls `Tokenizer.encode_batch_fast` on
1,000 documents at a time, counting tokens (nothing written); `prepare()` called in this process and
`moeyard prepare` (the command, in a subprocess: the difference is its start-up) tokenize the same file into
tokens.bin, and with `--parquet` the command does the same documents as a Parquet file. All use the
tokenizer's thread pool (every core). The baseline runs first and again last, and the ratios are to its mean
rate, since a shared machine's load drifts over minutes. The table prints seconds, tokens/s and the ratio
(higher is faster); prepare's token count is checked against the baseline's plus one separator per document.

Run: .venv/bin/python benchmarks/prepare_throughput.py [--mb 200] [--parquet] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moeyard.interop.prepare import prepare

SYLLABLES = ["ka", "to", "ri", "men", "sa", "lo", "pe", "qu", "ist", "ion", "an", "der", "th", "ing", "ed", "ous"]
BASELINE_DOCS = 1000
"""Documents per `encode_batch_fast` call in the baseline loop."""


def write_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """Writes about `mb` MB of JSONL documents {"text": ...} to `path`; returns the document count."""
    rng = np.random.default_rng(seed)
    words = ["".join(rng.choice(SYLLABLES, size=int(rng.integers(1, 4)))) for _ in range(20_000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    docs = size = 0
    with open(path, "w") as fh:
        while size < mb * 1e6:
            lengths = rng.integers(100, 800, size=1000)
            ids = rng.choice(len(words), size=int(lengths.sum()), p=zipf / zipf.sum())
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            texts = (" ".join(words[i] for i in ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            lines = [json.dumps({"text": text}) + "\n" for text in texts]
            fh.writelines(lines)
            size += sum(len(line) for line in lines)
            docs += len(lines)
    return docs


def documents(path: Path):
    with open(path) as fh:
        for line in fh:
            yield json.loads(line)["text"]


def train_tokenizer(corpus: Path, out: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(itertools.islice(documents(corpus), 2000), trainer)
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return out


def plain_loop(corpus: Path, tokenizer: Path) -> int:
    """The baseline: parse, batch, encode_batch_fast; returns the token count."""
    tok = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    tokens, batch = 0, []
    for text in documents(corpus):
        batch.append(text)
        if len(batch) == BASELINE_DOCS:
            tokens += sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=False))
            batch = []
    return tokens + sum(len(e.ids) for e in tok.encode_batch_fast(batch, add_special_tokens=False))


def run_prepare(source: Path, tokenizer: Path, out: Path) -> int:
    """`moeyard prepare` in a subprocess (progress lines go to its stderr); returns the token count."""
    cmd = [sys.executable, "-m", "moeyard.launch.cli", "prepare", str(source), "--tokenizer", str(tokenizer)]
    subprocess.run([*cmd, "--out", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "meta.json").read_text())["num_tokens"]


def call_prepare(source: Path, tokenizer: Path, out: Path) -> int:
    """The same work as the command without its start-up (importing torch and Hydra, a few seconds)."""
    return prepare([source], out, tokenizer=tokenizer)["num_tokens"]


def to_parquet(corpus: Path, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        batch = []
        for text in documents(corpus):
            batch.append(text)
            if len(batch) == 10_000:
                writer.write_table(pa.table({"text": batch}))
                batch = []
        if batch:
            writer.write_table(pa.table({"text": batch}))


def timed(fn, *args) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn(*args)
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="corpus size in MB")
    parser.add_argument("--parquet", action="store_true", help="also prepare the same documents as Parquet")
    parser.add_argument("--quick", action="store_true", help="2 MB, Parquet included: a smoke run")
    args = parser.parse_args()
    mb, parquet = (2.0, True) if args.quick else (args.mb, args.parquet)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.jsonl"
        docs = write_corpus(corpus, mb)
        tokenizer = train_tokenizer(corpus, root / "tok")
        size = corpus.stat().st_size / 1e6
        threads = os.environ.get("RAYON_NUM_THREADS", f"{os.cpu_count()} (all cores)")
        ids = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab_size()
        print(f"corpus: {size:,.1f} MB JSONL, {docs:,} documents; BPE of {ids:,} ids; tokenizer threads: {threads}")
        rows = [("tokenizers encode_batch_fast loop", *timed(plain_loop, corpus, tokenizer))]
        rows.append(("prepare() in-process jsonl", *timed(call_prepare, corpus, tokenizer, root / "out_call")))
        rows.append(("moeyard prepare jsonl", *timed(run_prepare, corpus, tokenizer, root / "out_jsonl")))
        if parquet:
            to_parquet(corpus, root / "corpus.parquet")
            prepared = timed(run_prepare, root / "corpus.parquet", tokenizer, root / "out_parquet")
            rows.append(("moeyard prepare parquet", *prepared))
        rows.append(("tokenizers loop, again", *timed(plain_loop, corpus, tokenizer)))
    base_tokens = rows[0][2]
    for name, _, tokens in rows[1:-1]:
        assert tokens == base_tokens + docs, f"{name}: {tokens} tokens, expected {base_tokens} + {docs} separators"
    base_rate = base_tokens / (rows[0][1] + rows[-1][1]) * 2  # the baseline before and after: load drifts
    print(f"{'':36}{'seconds':>10}{'tokens/s':>14}{'ratio':>8}")
    for name, seconds, tokens in rows:
        rate = tokens / seconds
        print(f"{name:36}{seconds:>10.2f}{rate:>14,.0f}{rate / base_rate:>8.2f}")


if __name__ == "__main__":
    main()
