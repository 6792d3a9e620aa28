"""`moeyard prepare --tokenizer`: Hugging Face tokenizers built here (no hub), uint16/uint32 by vocabulary,
end-of-text separators and how they are found, metadata identity, JSONL fields, streaming with flat memory,
one-line errors, and training on uint32 tokens.

Run: `.venv/bin/pytest -q tests/unit/test_tokenizers.py`.
"""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import moeyard.interop.prepare as prepare_module
from moeyard.interop.prepare import load_tokenizer, prepare
from moeyard.job.compose import compose
from moeyard.job.schema import ConfigError
from moeyard.launch.cli import main
from moeyard.launch.validate import validate
from moeyard.train.data import load_token_dir

BIG_VOCAB = 70_000  # > 65,535: needs uint32
BIG_EOS = BIG_VOCAB + 1  # ids: w0..w69999, [UNK], <|endoftext|>


def word_level(words: list[str], path: Path, config: dict | None = None) -> Path:
    """A WordLevel tokenizer splitting on whitespace, saved as DIR/tokenizer.json (+ tokenizer_config.json)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def big_tok(tmp_path_factory) -> Path:
    words = [f"w{i}" for i in range(BIG_VOCAB)] + ["[UNK]", "<|endoftext|>"]
    return word_level(words, tmp_path_factory.mktemp("tok") / "big-wl")


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory) -> Path:
    words = ["[UNK]", "</s>", "<|endoftext|>", "hello", "world", "again"]
    return word_level(words, tmp_path_factory.mktemp("tok") / "small-wl", {"eos_token": "</s>"})


def tokens_of(out: Path, meta: dict) -> list[int]:
    return np.fromfile(out / "tokens.bin", dtype=meta["dtype"]).tolist()


def test_small_vocabulary_writes_uint16(small_tok, tmp_path):
    (tmp_path / "a.txt").write_text("hello world\nhello\n")
    (tmp_path / "b.txt").write_text("again world")
    meta = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", tokenizer=small_tok)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 6
    assert meta["eos_token"] == "</s>" and meta["eos_id"] == 1  # tokenizer_config.json beats <|endoftext|>
    assert tokens_of(tmp_path / "out", meta) == [3, 4, 3, 1, 5, 4, 1]  # one document per text file


def test_large_vocabulary_writes_uint32_and_names_the_tokenizer(big_tok, tmp_path):
    (tmp_path / "a.txt").write_text("w0 w69999 w65536")
    out = tmp_path / "out"
    meta = prepare([tmp_path / "a.txt"], out, tokenizer=big_tok)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == BIG_VOCAB + 2
    assert tokens_of(out, meta) == [0, 69999, 65536, BIG_EOS]
    file = big_tok / "tokenizer.json"
    assert meta["tokenizer"] == "big-wl" and meta["tokenizer_path"] == str(file.resolve())
    assert meta["tokenizer_sha256"] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert meta["eos_token"] == "<|endoftext|>" and meta["eos_id"] == BIG_EOS
    assert meta["documents"] == 1 and meta["files"] == 1
    assert json.loads((out / "meta.json").read_text()) == meta
    assert load_token_dir(out, vocab_size=BIG_VOCAB + 2).dtype == np.uint32
    # The same tokenizer given as its file: same tokens, same identity.
    again = prepare([tmp_path / "a.txt"], tmp_path / "out2", tokenizer=file)
    assert again["tokenizer_sha256"] == meta["tokenizer_sha256"] and again["tokenizer"] == "big-wl"


def test_model_vocab_too_small_is_one_line_naming_both(big_tok, tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2")
    prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer=big_tok)
    with pytest.raises(ValueError) as info:
        load_token_dir(tmp_path / "out", vocab_size=65536)
    msg = str(info.value)
    assert "\n" not in msg and "vocab_size=70002 of tokenizer big-wl" in msg and "model.vocab_size=65536" in msg
    assert "rule: token ids must fit the embedding" in msg


@pytest.mark.parametrize(
    "config, words, given, eos",
    [
        ({"eos_token": {"content": "<eos>", "special": True}}, ["<eos>", "</s>"], None, "<eos>"),
        (None, ["x", "<|end_of_text|>", "</s>"], None, "</s>"),  # the first common name that is present
        (None, ["x", "<|end_of_text|>"], None, "<|end_of_text|>"),
        ({"bos_token": "<s>"}, ["x", "<|endoftext|>"], None, "<|endoftext|>"),
        ({"eos_token": "</s>"}, ["</s>", "<sep>"], "<sep>", "<sep>"),  # --eos-token wins
    ],
    ids=["config-dict", "common-order", "llama3", "config-without-eos", "given"],
)
def test_end_of_text_token_is_found(tmp_path, config, words, given, eos):
    tok = word_level(["[UNK]", "hello", *words], tmp_path / "tok", config)
    (tmp_path / "a.txt").write_text("hello")
    meta = prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer=tok, eos_token=given)
    assert meta["eos_token"] == eos and tokens_of(tmp_path / "out", meta) == [1, 2 + words.index(eos)]


@pytest.mark.parametrize(
    "config, given, message",
    [
        (None, None, "has no end-of-text token (rule: tokenizer_config.json's eos_token, else the first of"),
        (None, "<nope>", "--eos-token='<nope>' is not in the vocabulary"),
        ({"eos_token": "<nope>"}, None, "eos_token='<nope>' is not in the vocabulary (rule: give --eos-token)"),
    ],
    ids=["none", "given-unknown", "config-unknown"],
)
def test_missing_end_of_text_token_is_refused(tmp_path, config, given, message):
    tok = word_level(["[UNK]", "hello"], tmp_path / "tok", config)
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ValueError) as info:
        prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer=tok, eos_token=given)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_jsonl_documents_from_a_named_field(small_tok, tmp_path):
    lines = [{"body": "hello world", "id": 1}, {"body": "again"}, {"body": ""}]
    text = "\n".join(json.dumps(r) for r in lines[:2]) + "\n\n  \n" + json.dumps(lines[2]) + "\n"
    (tmp_path / "d.jsonl").write_text(text)
    (tmp_path / "e.json").write_text(json.dumps({"body": "world"}))  # .json is JSONL too
    meta = prepare([tmp_path], tmp_path / "out", tokenizer=small_tok, text_field="body")
    assert meta["documents"] == 4 and meta["text_field"] == "body"  # blank lines are not documents
    assert tokens_of(tmp_path / "out", meta) == [3, 4, 1, 5, 1, 1, 4, 1]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "hello"}', "--text-field=body is not a string field of this line"),
        ('{"body": 3}', "--text-field=body is not a string field of this line"),
        ('{"body": "hello"', "is not JSON (rule: .jsonl/.json inputs hold one JSON object per line)"),
    ],
    ids=["missing", "not-string", "not-json"],
)
def test_bad_jsonl_line_is_one_line_naming_file_and_line(small_tok, tmp_path, line, message):
    (tmp_path / "d.jsonl").write_text('{"body": "hello"}\n' + line + "\n")
    with pytest.raises(ValueError) as info:
        prepare([tmp_path / "d.jsonl"], tmp_path / "out", tokenizer=small_tok, text_field="body")
    assert f"{tmp_path / 'd.jsonl'}:2" in str(info.value) and message in str(info.value)
    assert not list((tmp_path / "out").iterdir())  # no partial tokens.bin(.tmp)


def test_saved_truncation_does_not_cut_documents(tmp_path):
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "a": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.enable_truncation(max_length=4)  # as BERT-style tokenizer.json files ship
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("a " * 10)
    meta = prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer=tmp_path / "tokenizer.json")
    assert tokens_of(tmp_path / "out", meta) == [2] * 10 + [1]


def test_trained_bpe_round_trips_each_document(tmp_path):
    corpus = ["the quick brown fox jumps over the lazy dog", "über naïve café ✓", "def f(x):\n    return x"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text(corpus[2])
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus[:2]))
    meta = prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], tmp_path / "out", tokenizer=tmp_path)
    ids = np.array(tokens_of(tmp_path / "out", meta))
    docs = np.split(ids, np.flatnonzero(ids == meta["eos_id"]) + 1)[:-1]
    assert [tok.decode(d[:-1].tolist()) for d in docs] == [corpus[2], *corpus[:2]]
    assert all(d[-1] == meta["eos_id"] for d in docs) and meta["eos_id"] not in np.concatenate([d[:-1] for d in docs])


def test_large_input_streams_in_batches_with_flat_memory(big_tok, tmp_path, monkeypatch, capsys):
    """~3 MB of JSONL in 128 KiB batches: Python/numpy memory stays far below the input, tokens are exact."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, BIG_VOCAB, size=int(n)) for n in rng.integers(50, 400, size=2000)]
    path = tmp_path / "big.jsonl"
    with open(path, "w") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": " ".join(f"w{i}" for i in doc)}) + "\n")
    size = path.stat().st_size
    assert size > 3e6
    monkeypatch.setattr(prepare_module, "PROGRESS_EVERY_S", 0.0)  # a line per batch: shows the batching
    loaded = load_tokenizer(big_tok)  # its vocabulary's memory is fixed, whatever the input: not counted
    monkeypatch.setattr(prepare_module, "load_tokenizer", lambda path, eos: loaded)
    tracemalloc.start()
    try:
        meta = prepare([path], tmp_path / "out", tokenizer=big_tok, progress=True, batch_bytes=128 << 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB input"
    expected = np.concatenate([np.append(d, BIG_EOS) for d in docs])
    assert meta["num_tokens"] == expected.size and meta["documents"] == len(docs)
    assert np.array_equal(np.fromfile(tmp_path / "out" / "tokens.bin", dtype=np.uint32), expected)
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prepare:")]
    assert len(progress) >= size // (128 << 10) - 1 and "MB" in progress[-1] and "tokens" in progress[-1]


def test_large_text_file_is_one_document_encoded_in_pieces(big_tok, tmp_path):
    rng = np.random.default_rng(1)
    words = rng.integers(0, BIG_VOCAB, size=40_000)
    lines = [" ".join(f"w{i}" for i in words[k : k + 13]) for k in range(0, words.size, 13)]
    (tmp_path / "a.txt").write_text("\n".join(lines))  # ~270 KB, pieces of ~1 KiB
    meta = prepare([tmp_path / "a.txt"], tmp_path / "out", tokenizer=big_tok, batch_bytes=16 << 10)
    assert meta["documents"] == 1 and tokens_of(tmp_path / "out", meta) == [*words.tolist(), BIG_EOS]


def test_cli_prepares_uint32_tokens_then_trains_on_them(moeyard, big_tok, tmp_path, capsys):
    docs = [" ".join(f"w{(i * 7919 + j * 104729) % BIG_VOCAB}" for j in range(300)) for i in range(20)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"content": d}) for d in docs))
    out = tmp_path / "tok"
    argv = ["prepare", str(tmp_path / "d.jsonl"), "--tokenizer", str(big_tok), "--text-field", "content"]
    assert main([*argv, "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "6020 uint32 tokens (20 documents)" in stdout and "tokenizer big-wl" in stdout
    common = ["experiment=debug", "data=tokens", f"data.path={out}", "train.steps=2", "train.log_every=1"]
    with pytest.raises(ConfigError) as info:  # validation before spawning: the debug model has 256 ids
        validate(compose([*common, "run.dir=unused"]), 1)
    msg = str(info.value)
    assert msg.startswith(f"data.path={out}: vocab_size=70002 of tokenizer big-wl exceeds model.vocab_size=256 ")
    assert msg.endswith("(rule: token ids must fit the embedding; set model.vocab_size>=70002)") and "\n" not in msg
    run = tmp_path / "run"
    proc = moeyard("train", *common, "model.vocab_size=70016", f"run.dir={run}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2] and steps[0]["loss"] > 10  # ln(70016) = 11.2 nats at the start


def test_cli_unreadable_tokenizer_is_one_line(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    for given in (tmp_path / "tokenizer.json", tmp_path / "missing"):
        assert main(["prepare", str(tmp_path / "a.txt"), "--tokenizer", str(given), "--out", str(tmp_path / "o")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"--tokenizer={given}" in lines[0] and "(rule: " in lines[0]
    assert not (tmp_path / "o").exists()
