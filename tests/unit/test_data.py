"""Data: byte tokenizer, `moeyard prepare` token files and training from them, bad files, batch sampling,
and document masking (document ids from separators, then positions and the block-causal mask).

Hugging Face tokenizers are tested in tests/unit/test_tokenizers.py.
Run: `.venv/bin/pytest -q tests/unit/test_data.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moeyard.interop.prepare import prepare
from moeyard.moe.masking import block_causal_mask, document_attention, document_positions
from moeyard.train.data import (
    EOS,
    DataConfig,
    TokenData,
    build_data,
    decode,
    document_ids,
    encode,
    load_token_dir,
    stdlib_files,
)

TEXT_A = "def add(a, b):\n    return a + b  # ünïcode ✓\n" * 40
TEXT_B = "class Point:\n    x: int = 0\n" * 40


def test_byte_tokenizer_round_trip():
    text = "héllo wörld ✓\n\tend"
    tokens = encode(text)
    assert len(tokens) == len(text.encode("utf-8")) and int(tokens.max()) < 256
    assert list(encode("AB")) == [65, 66]
    assert decode(tokens) == text
    assert decode([*encode("ab"), EOS, *encode("c")]) == "abc"  # the separator is not text


def test_stdlib_corpus_is_sorted_and_stable():
    files = stdlib_files(20)
    assert len(files) == 20 and files == sorted(files) and files == stdlib_files(20)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


@pytest.fixture
def text_dir(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "b.py").write_text(TEXT_B)
    (src / "sub" / "a.txt").write_text(TEXT_A)
    return src


def test_prepare_writes_tokens_and_meta(text_dir, tmp_path):
    out = tmp_path / "tok"
    meta = prepare([text_dir], out)
    expected = [*encode(TEXT_B), EOS, *encode(TEXT_A), EOS]  # files in sorted path order: b.py, sub/a.txt
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["num_tokens"] == len(expected) and meta["files"] == 2 and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 256 and meta["eos_id"] == EOS
    assert meta["documents"] == 2
    assert np.fromfile(out / "tokens.bin", dtype=np.uint16).tolist() == expected
    assert load_token_dir(out, vocab_size=256).tolist() == expected
    assert not list(out.glob("*.tmp"))


def test_prepare_cli_then_train_from_tokens(moeyard, text_dir, tmp_path):
    out = tmp_path / "tok"
    proc = moeyard("prepare", str(text_dir), "--out", str(out), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "from 2 files" in proc.stdout
    run = tmp_path / "run"
    proc = moeyard(
        "train", "model=debug", "data=tokens", f"data.path={out}", "train.steps=3", "train.batch_size=2",
        "train.seq_len=16", "train.log_every=1", "train.eval_every=0", "profiling.progress=false", f"run.dir={run}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert "source: tokens" in (run / "config.yaml").read_text()


def test_prepare_skips_hidden_files(text_dir, tmp_path):
    (text_dir / ".git" / "objects").mkdir(parents=True)
    (text_dir / ".git" / "objects" / "ab").write_bytes(b"\x78\x9c binary")
    (text_dir / ".notes.txt").write_text("private")
    assert prepare([text_dir], tmp_path / "tok")["files"] == 2


def test_prepare_cli_missing_input_is_one_line(moeyard, tmp_path):
    proc = moeyard("prepare", "no_such_file.txt", "--out", str(tmp_path / "o"), timeout=60)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "no_such_file.txt" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_prepare_cli_unwritable_out_is_one_line(moeyard, text_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = moeyard("prepare", str(text_dir), "--out", str(blocker), timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(blocker) in proc.stderr


@pytest.fixture
def prepared(text_dir, tmp_path) -> Path:
    out = tmp_path / "tok"
    prepare([text_dir], out)
    return out


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "meta.json").write_text("{not json"), "meta.json is corrupt"),
        (lambda d: (d / "meta.json").write_text('{"dtype": "uint16"}'), "meta.json is corrupt"),
        (lambda d: (d / "tokens.bin").unlink(), "lacks meta.json or tokens.bin"),
        (lambda d: (d / "meta.json").unlink(), "lacks meta.json or tokens.bin"),
        (lambda d: (d / "tokens.bin").write_bytes((d / "tokens.bin").read_bytes()[:-3]), "tokens.bin has"),
        (lambda d: _edit_meta(d, dtype="float32"), "token files are uint16 or uint32"),
        (lambda d: _edit_meta(d, vocab_size=50000), "exceeds model.vocab_size=256"),
    ],
    ids=["bad-json", "missing-key", "no-bin", "no-meta", "truncated", "dtype", "vocab"],
)
def test_bad_token_files_give_one_line_errors(prepared, damage, message):
    damage(prepared)
    with pytest.raises(ValueError) as info:
        load_token_dir(prepared, vocab_size=256)
    assert message in str(info.value) and f"data.path={prepared}" in str(info.value)
    assert "\n" not in str(info.value)


def _edit_meta(d: Path, **changes) -> None:
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text(json.dumps({**meta, **changes}))


def test_truncated_tokens_fail_the_cli_before_training(moeyard, prepared, tmp_path):
    (prepared / "tokens.bin").write_bytes((prepared / "tokens.bin").read_bytes()[:-2])
    run = tmp_path / "run"
    proc = moeyard("train", "data=tokens", f"data.path={prepared}", f"run.dir={run}", timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "tokens.bin has" in lines[0] and "Traceback" not in proc.stderr
    assert not run.exists()


def test_too_few_tokens_for_seq_len(prepared):
    with pytest.raises(ValueError, match=r"cannot hold train.seq_len=4096"):
        build_data(DataConfig(source="tokens", path=str(prepared)), seq_len=4096, seed=0, vocab_size=256)


def test_batches_depend_only_on_seed_and_step():
    stream = np.arange(5000, dtype=np.uint16)  # token i at position i: rows show where they came from
    a = TokenData(train=stream[:4500], val=stream[4500:], seq_len=16, seed=3)
    b = TokenData(train=stream[:4500], val=stream[4500:], seq_len=16, seed=3)
    for _ in range(2):  # order of calls does not matter: no hidden state
        x7, y7 = a.batch(7, 4)
        a.batch(8, 4)
    xb, yb = b.batch(7, 4)
    assert torch.equal(x7, xb) and torch.equal(y7, yb)
    assert x7.shape == (4, 16) and x7.dtype == torch.int64
    assert torch.equal(x7[:, 1:], y7[:, :-1])  # targets are the next tokens
    assert not torch.equal(a.batch(8, 4)[0], x7)
    other_seed = TokenData(train=stream[:4500], val=stream[4500:], seq_len=16, seed=4)
    assert not torch.equal(other_seed.batch(7, 4)[0], x7)
    # Held-out batches are fixed and come from the held-out tail only.
    ex, _ = a.eval_batch(0, 4)
    assert torch.equal(ex, b.eval_batch(0, 4)[0])
    assert (ex >= 4500).all() and (x7 < 4500).all()
    assert torch.equal(ex[:, 1:] - ex[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # contiguous windows


def test_text_pieces_decode_like_reading_the_whole_file(tmp_path):
    """A file read in tiny pieces (splitting characters and \\r\\n) gives the same bytes as one read."""
    text = "ünï\r\ncode ✓ line\r\n" * 50 + "no newline at the end ✓\r"
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8") + b"\xff bad byte\n")
    prepare([tmp_path / "a.txt"], tmp_path / "whole")
    meta = prepare([tmp_path / "a.txt"], tmp_path / "pieces", batch_bytes=7)
    whole = np.fromfile(tmp_path / "whole" / "tokens.bin", dtype=np.uint16)
    pieces = np.fromfile(tmp_path / "pieces" / "tokens.bin", dtype=np.uint16)
    assert np.array_equal(whole, pieces) and meta["documents"] == 1
    expected = (tmp_path / "a.txt").read_text(encoding="utf-8", errors="replace")
    assert decode(pieces) == expected and "\r" not in decode(pieces)


def test_eos_token_needs_a_tokenizer(text_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--eos-token='</s>' needs --tokenizer"):
        prepare([text_dir], tmp_path / "tok", eos_token="</s>")


# Document masking: ids from separators (data side), positions and mask (moe/masking.py).


def test_document_ids_count_separators_before_each_token():
    x = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8], [EOS, 1, 2, 3, 4, 5, 6]])
    assert document_ids(x, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert document_ids(torch.tensor([[3, 9, 3]]), eos_id=9).tolist() == [[0, 0, 1]]


def test_token_data_documents_follow_the_config(prepared):
    on = build_data(DataConfig(source="tokens", path=str(prepared), document_mask=True), 16, 0, 256)
    off = build_data(DataConfig(source="tokens", path=str(prepared)), 16, 0, 256)
    x, _ = on.batch(0, 4)
    assert on.eos_id == EOS and torch.equal(on.documents(x), document_ids(x, EOS))
    assert off.documents(x) is None
    assert build_data(DataConfig(document_mask=True, max_files=3), 16, 0, 256).documents(x) is not None


def test_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0], [4, 7, 7, 7, 4, 4]])
    pos = document_positions(ids)
    assert pos.dtype == torch.int64
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 0, 1]]


def test_block_causal_mask_by_hand():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 3, 2]]))
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    # Runs, not ids: the last token's id 2 repeats an earlier document's, yet it sees only itself.
    assert mask[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1]
    assert mask.diagonal(dim1=-2, dim2=-1).all()  # no empty query row, so no NaN in softmax


def test_masked_attention_equals_attention_per_document():
    """SDPA with the mask on a packed row gives each document's own causal attention."""
    torch.manual_seed(0)
    tokens = torch.tensor([[4, 5, EOS, 6, 7, 8, EOS, 9], [1, 2, 3, 4, 5, 6, 7, 8]])
    positions, mask = document_attention(document_ids(tokens, EOS))
    q, k, v = (torch.randn(2, 3, 8, 4) for _ in range(3))  # [B, heads, S, head_dim]
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for b, spans in ((0, [(0, 3), (3, 7), (7, 8)]), (1, [(0, 8)])):
        for lo, hi in spans:
            alone = F.scaled_dot_product_attention(q[b, :, lo:hi], k[b, :, lo:hi], v[b, :, lo:hi], is_causal=True)
            torch.testing.assert_close(packed[b, :, lo:hi], alone)
            assert positions[b, lo:hi].tolist() == list(range(hi - lo))
