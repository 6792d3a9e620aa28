"""`moeyard prepare --chat`: chat rows rendered with the model's own template, and the loss mask beside them.

Checks, on tokenizers built here (no hub): the token ids equal transformers' `apply_chat_template(...,
tokenize=True)` for a Qwen-style (<|im_start|>) and a Llama-3-style template written below; the mask covers
exactly each assistant turn's content and end-of-turn text (not its header, not the prompts); --loss-on
last/all; the long-row rule (refuse or cut, counted in meta.json, and train.seq_len checked against it);
refusals of a separator inside a row and of a template that is not prefix-stable; the CLI end to end; and that
one process's training loss is the mean over the counted targets of the global batch.

Run: `.venv/bin/pytest -q tests/unit/test_chat.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moeyard.interop.chat import ChatOptions, prepare_chat
from moeyard.job.compose import compose
from moeyard.launch.cli import main
from moeyard.train.data import IGNORE, DataConfig, build_data
from moeyard.train.trainer import Trainer

QWEN = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""Qwen2.5's template without tools: a default system prompt, turns closed by <|im_end|> and a newline."""
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' + system_message + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
"""Llama 3.2's template without tools: BOS, a dated system header (strftime_now), content trimmed, <|eot_id|>."""
SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip
CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris, of course."},
        {"role": "user", "content": "And of Italy? Answer briefly."},
        {"role": "assistant", "content": "Rome."},
    ],
    [
        {"role": "system", "content": "You answer in lists."},
        {"role": "user", "content": "Name two colours."},
        {"role": "assistant", "content": "- red\n- blue"},
    ],
    [{"role": "user", "content": "Ünïcödé text: naïve café 東京"}, {"role": "assistant", "content": " spaced  "}],
]
ASSISTANT_TAIL = {"qwen": "<|im_end|>\n", "llama3": "<|eot_id|>"}
"""What the template closes an assistant turn with: trained with the content (the mask's end-of-turn text)."""


def byte_level_bpe(folder: Path, template: str, eos: str, bos: str | None = None) -> Path:
    """A byte-level BPE tokenizer trained here on the conversations' text (Qwen and Llama 3 are byte-level
    BPE), with the special tokens, saved with a tokenizer_config.json naming the template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for conv in CONVERSATIONS for m in conv] * 20 + ["system user assistant Today Date"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": template, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}
    if bos is not None:
        config["bos_token"] = bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tokenizers_by_style(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-tok")
    return {
        # The separator is the base model's end of text: it never occurs inside a conversation.
        "qwen": byte_level_bpe(root / "qwen", QWEN, eos="<|endoftext|>"),
        "llama3": byte_level_bpe(root / "llama3", LLAMA3, eos="<|end_of_text|>", bos="<|begin_of_text|>"),
    }


def write_rows(path: Path, conversations: list, field: str = "messages") -> Path:
    path.write_text("".join(json.dumps({field: c}) + "\n" for c in conversations))
    return path


def read_out(out: Path, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    return np.fromfile(out / "tokens.bin", dtype=meta["dtype"]), np.fromfile(out / meta["loss_mask"], dtype=np.uint8)


def split_rows(tokens: np.ndarray, mask: np.ndarray, eos_id: int) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) of each row of a prepared stream, separators dropped (each row is followed by one)."""
    ends = np.flatnonzero(tokens == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert ends[-1] == len(tokens) - 1 and not mask[ends].any(), "every row ends with an untrained separator"
    return [(tokens[s:e].tolist(), mask[s:e].tolist()) for s, e in zip(starts, ends, strict=True)]


@pytest.mark.parametrize("style", ["qwen", "llama3"])
def test_tokens_equal_transformers_and_mask_covers_assistant_turns(style, tokenizers_by_style, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tokenizers_by_style[style]
    rows = write_rows(tmp_path / "chat.jsonl", CONVERSATIONS)
    meta = prepare_chat([rows], tmp_path / "out", folder)
    tokens, mask = read_out(tmp_path / "out", meta)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    got = split_rows(tokens, mask, meta["eos_id"])
    assert len(got) == len(CONVERSATIONS) == meta["documents"]
    for (ids, row_mask), conv in zip(got, CONVERSATIONS, strict=True):
        assert ids == list(hf.apply_chat_template(conv, tokenize=True)["input_ids"])
        # The trained tokens decode to exactly the assistant turns' content and end-of-turn text, in order.
        trained = [i for i, m in zip(ids, row_mask, strict=True) if m]
        content = [
            m["content"].strip() if style == "llama3" else m["content"] for m in conv if m["role"] == "assistant"
        ]
        want = "".join(c + ASSISTANT_TAIL[style] for c in content)
        assert hf.decode(trained) == want
        # ... and they are whole runs: each assistant turn one contiguous span.
        runs = np.flatnonzero(np.diff([0, *row_mask, 0]) == 1)
        assert len(runs) == len(content)
    assert meta["loss_tokens"] == int(mask.sum()) and meta["rows_cut"] == 0
    assert meta["longest_row"] == max(len(ids) for ids, _ in got)


def test_loss_on_last_and_all(tokenizers_by_style, tmp_path):
    folder = tokenizers_by_style["qwen"]
    rows = write_rows(tmp_path / "chat.jsonl", CONVERSATIONS[:1], field="conversation")
    per_mode = {}
    for mode in ("assistant", "last", "all"):
        opts = ChatOptions(messages_field="conversation", loss_on=mode)
        meta = prepare_chat([rows], tmp_path / mode, folder, opts)
        per_mode[mode] = read_out(tmp_path / mode, meta)[1]
    tokens = read_out(tmp_path / "all", meta)[0]
    assert per_mode["all"][:-1].all() and per_mode["all"][-1] == 0  # every token but the separator
    last, every = per_mode["last"], per_mode["assistant"]
    assert 0 < last.sum() < every.sum() and (last <= every).all()
    assert every[: np.flatnonzero(last)[0]].sum() > 0 and not last[: np.flatnonzero(last)[0]].any()
    assert len(tokens) == len(every)


def test_long_rows_are_refused_or_cut_and_counted(tokenizers_by_style, tmp_path):
    folder = tokenizers_by_style["qwen"]
    rows = write_rows(tmp_path / "chat.jsonl", CONVERSATIONS)
    full = prepare_chat([rows], tmp_path / "full", folder)
    lengths = sorted(len(ids) for ids, _ in split_rows(*read_out(tmp_path / "full", full), full["eos_id"]))
    limit = lengths[1]  # the longest row is over it, the others fit
    with pytest.raises(ValueError, match=rf"chat.jsonl:1: {lengths[-1]} tokens > --seq-len={limit} "):
        prepare_chat([rows], tmp_path / "refused", folder, ChatOptions(seq_len=limit))
    assert not (tmp_path / "refused" / "tokens.bin").exists()
    assert not list((tmp_path / "refused").glob("*.tmp"))  # nothing half-written left behind
    meta = prepare_chat([rows], tmp_path / "cut", folder, ChatOptions(seq_len=limit, long_rows="cut"))
    assert meta["rows_cut"] == 1 and meta["longest_row"] == limit and meta["seq_len"] == limit
    tokens, mask = read_out(tmp_path / "cut", meta)
    cut_ids, cut_mask = split_rows(tokens, mask, meta["eos_id"])[0]
    full_ids, full_mask = split_rows(*read_out(tmp_path / "full", full), full["eos_id"])[0]
    assert cut_ids == full_ids[:limit] and cut_mask == full_mask[:limit]
    # Training refuses a directory whose rows do not fit its windows.
    cfg = DataConfig(source="tokens", path=str(tmp_path / "cut"))
    with pytest.raises(ValueError, match=rf"train.seq_len={limit - 1} is shorter than the longest chat row"):
        build_data(cfg, seq_len=limit - 1, seed=0, vocab_size=512)


def test_refusals_name_the_row(tokenizers_by_style, tmp_path):
    folder = tokenizers_by_style["qwen"]
    rows = write_rows(tmp_path / "chat.jsonl", CONVERSATIONS)
    # Qwen-instruct's eos is the end-of-turn token: it would split every turn into its own document.
    with pytest.raises(ValueError, match=r"chat.jsonl:1: the separator '<\|im_end\|>' occurs inside the row"):
        prepare_chat([rows], tmp_path / "a", folder, eos_token="<|im_end|>")
    # A template that writes a turn differently once another follows (here: the last turn is marked).
    unstable = tmp_path / "unstable.jinja"
    unstable.write_text("{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: the chat template renders assistant message 1 differently"):
        prepare_chat([rows], tmp_path / "b", folder, ChatOptions(template=unstable))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: --messages-field=messages is not a list of messages"):
        prepare_chat([bad], tmp_path / "c", folder)
    with pytest.raises(ValueError, match=r"--loss-on=some must be one of assistant, last, all"):
        prepare_chat([rows], tmp_path / "d", folder, ChatOptions(loss_on="some"))


def test_cli_end_to_end(tokenizers_by_style, tmp_path, capsys):
    folder = tokenizers_by_style["llama3"]
    rows = write_rows(tmp_path / "chat.jsonl", CONVERSATIONS)
    out = tmp_path / "out"
    argv = ["prepare", str(rows), "--chat", "--tokenizer", str(folder), "--out", str(out), "--seq-len", "20"]
    assert main([*argv, "--long-rows", "cut"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["loss_on"] == "assistant" and meta["rows_cut"] >= 1 and meta["longest_row"] == 20
    assert f"{meta['loss_tokens']} of {meta['num_tokens']} tokens in the loss" in capsys.readouterr().out
    assert main(argv) == 2  # refused: one line naming the row and the rule
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chat.jsonl:1:" in err and "--long-rows cut" in err
    assert main(["prepare", str(rows), "--chat", "--out", str(tmp_path / "x")]) == 2
    assert "--chat needs --tokenizer" in capsys.readouterr().err


def test_training_loss_is_the_mean_over_counted_targets(tokenizers_by_style, tmp_path):
    """One process, two micro-batches: the step's logged loss is sum(counted token losses) / count over the
    whole batch, not the mean of the micro-batches' means (their counts differ)."""
    folder = tokenizers_by_style["qwen"]
    rows = write_rows(tmp_path / "chat.jsonl", CONVERSATIONS * 30)
    prepare_chat([rows], tmp_path / "data", folder)
    overrides = ["model=debug", "model.vocab_size=512", "train.steps=1", "train.batch_size=4", "train.seq_len=64"]
    overrides += ["train.micro_batches=2", "profiling=off", "train.eval_batches=1", "data=tokens"]
    cfg = compose([*overrides, f"data.path={tmp_path / 'data'}", f"run.dir={tmp_path / 'run'}"])
    trainer = Trainer(cfg)
    x, y = trainer.data.batch(0, 4)
    counted = y != IGNORE
    per_micro = counted.view(2, -1).sum(1)
    assert 0 < counted.sum() < y.numel() and per_micro[0] != per_micro[1], per_micro
    with torch.no_grad():
        logits = trainer.pm.parts[0](x)
    for moe in trainer.pm.moe_layers().values():
        moe.drain_stats()  # the step checks it ran one forward per micro-batch
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / counted.sum()
    got = trainer.train_step(log=True)["loss"]
    assert got == pytest.approx(float(want), rel=1e-5)
    # Eval counts the same targets: the held-out batch's mean over its counted targets.
    x, y = trainer.data.eval_batch(0, 4)
    with torch.no_grad():
        logits = trainer.pm.parts[0](x)
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / (y != IGNORE).sum()
    assert trainer.evaluate() == pytest.approx(float(want), rel=1e-5)
    # data.loss_mask=false trains on every target.
    off = compose([*overrides, f"data.path={tmp_path / 'data'}", "data.loss_mask=false", f"run.dir={tmp_path / 'r2'}"])
    assert (Trainer(off).data.batch(0, 4)[1] != IGNORE).all()
