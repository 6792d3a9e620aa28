"""From a published MoE to a fine-tuned one, as a user runs it, in one test.

A tiny Qwen3-MoE built offline (with a byte-level BPE tokenizer and a Qwen-style chat template) is imported
with `moeyard import` and fine-tuned on chat JSONL prepared by `moeyard prepare --chat` (loss on the answers
only), on 2 gloo ranks in a tp2·ep2 layout; the run is exported with `moeyard export`, and the greedy answer
`moeyard generate --chat` prints from the run equals transformers' `generate` on the export, prompt rendered
by transformers' `apply_chat_template`. Each step is checked to have done what it says: the mask leaves the
prompts out, the run trained under tp2·ep2 with a checkpoint, the exported weights moved from the import.

Run: .venv/bin/pytest -q tests/launchers/test_finetune_chat.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from moeyard.interop.generate import generate, load_checkpoint_model
from moeyard.launch.cli import main
from tests.helpers import REPO
from tests.unit.test_chat import CONVERSATIONS, QWEN, byte_level_bpe, write_rows
from tests.unit.test_generate import LOGIT_AGREEMENT, NEW_TOKENS, smallest_margin, transformers_greedy
from tests.unit.test_hf_families import save_tiny

QUESTION = "What is the capital of France?"
STEPS = 4


def chat_rows(n: int) -> list[list[dict]]:
    """`n` conversations: the test's own, numbered so that rows differ."""
    rows = []
    for i in range(n):
        for conversation in CONVERSATIONS:
            rows.append([{**m, "content": f"{m['content']} ({i})"} for m in conversation])
    return rows


def moeyard(*args: str, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "moeyard.launch.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for file in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(str(file)).items()}


@pytest.mark.timeout(420)
def test_import_finetune_on_chat_in_tp2_ep2_export_and_generate(tmp_path):
    tok_dir = byte_level_bpe(tmp_path / "tok", QWEN, eos="<|endoftext|>")
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    hf = tmp_path / "hf"
    save_tiny("qwen3_moe", hf, vocab_size=max(vocab.values()) + 16)  # room for the special tokens
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (hf / file).write_text((tok_dir / file).read_text())

    tokens = tmp_path / "tokens"
    rows = write_rows(tmp_path / "chat.jsonl", chat_rows(30))
    assert main(["prepare", str(rows), "--chat", "--tokenizer", str(hf), "--out", str(tokens)]) == 0
    meta = json.loads((tokens / "meta.json").read_text())
    assert 0 < meta["loss_tokens"] < meta["num_tokens"] / 2  # answers only: the prompts and headers are out

    run = tmp_path / "run"
    layout = ["launcher=local", "launcher.nproc_per_node=2", "parallel.tp=2", "parallel.ep=2"]
    train = [f"train.steps={STEPS}", "train.seq_len=96", "train.batch_size=4", "train.micro_batches=2"]
    train += ["train.log_every=1", "optim.lr=3e-3", "optim.warmup_steps=0", "checkpoint.enabled=true"]
    data = ["data=tokens", f"data.path={tokens}", "data.document_mask=true", "profiling=off"]
    moeyard("import", str(hf), *layout, *train, *data, f"run.dir={run}", timeout=300)
    resolved = (run / "config.yaml").read_text()
    assert "tp: 2" in resolved and "ep: 2" in resolved
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m][-1] == STEPS

    out = tmp_path / "out"
    moeyard("export", str(run), "--out", str(out), timeout=120)
    before, after = tensors(hf), tensors(out)
    moved = [k for k in before if k in after and not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert len(moved) > len(before) // 2, "fine-tuning moved the weights"

    tok = AutoTokenizer.from_pretrained(str(hf))
    messages = [{"role": "user", "content": QUESTION}]
    prompt_ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    theirs = transformers_greedy(out, prompt_ids)
    ours, _, _ = load_checkpoint_model(run, "generate", torch.device("cpu"))
    got = generate(ours, prompt_ids, NEW_TOKENS)
    # Greedy equality is well posed only where the two best logits are further apart than the models agree.
    assert smallest_margin(ours, prompt_ids + got, NEW_TOKENS) > 10 * LOGIT_AGREEMENT
    assert got == theirs, (got, theirs)

    printed = moeyard("generate", str(run), "--chat", "--prompt", QUESTION, "--max-new-tokens", str(NEW_TOKENS),
                      "--tokenizer", str(hf), timeout=120).stdout  # fmt: skip
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    shown = theirs[: theirs.index(eos)] if eos in theirs else theirs
    assert printed == tok.decode(shown, skip_special_tokens=True) + "\n"
