"""The golden contract on chat data with a loss mask: dp2, tp2, pp2 and ep2 train exactly like one process.

The data is `moeyard prepare --chat` output (a Qwen-style template, a word-level tokenizer built here, rows cut
to train.seq_len) with data.document_mask on. Assistant answers of random lengths make the counted targets
differ between the micro-batches and dp ranks of every step (asserted), so a layout that averaged per
micro-batch or per rank, instead of over the counted targets of the whole global batch, would show. The four
layouts train one after another in ONE spawned pair of gloo ranks (the second Trainer finds the process group
initialised and reuses it), each compared with the single-process reference of the golden suite
(`test_golden.reference`, `assert_same_training`, `assert_layout_applied`).

    .venv/bin/pytest -q tests/multiproc/test_golden_chat.py   # ~1 min on 2 idle cores
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tokenizers import Tokenizer, models, pre_tokenizers

from moeyard.interop.chat import ChatOptions, prepare_chat
from moeyard.job.compose import compose
from moeyard.parallel.state import full_state_dict
from moeyard.train.data import IGNORE, build_data
from tests.helpers import free_port, layout_facts, local_rank_env, make_trainer, spawn
from tests.multiproc import test_golden as golden

TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
WORDS = [f"w{i}" for i in range(200)]
SPECIALS = ["[UNK]", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
LAYOUTS = [golden.case(layout, []) for layout in (golden.DP2, golden.TP2, golden.PP2, golden.EP2)]


def chat_dir(root: Path) -> Path:
    """A prepared chat directory: 300 conversations of 1-2 exchanges, answers of 1-12 words."""
    folder = root / "tok"
    folder.mkdir()
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}  # 207 ids: fits the debug model's 256
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    rng = random.Random(0)
    say = lambda lo, hi: " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))  # noqa: E731
    rows = []
    for _ in range(300):
        turns = [({"role": "user", "content": say(1, 6)}, {"role": "assistant", "content": say(1, 12)})]
        turns *= rng.randint(1, 2)
        rows.append({"messages": [m for pair in turns for m in pair]})
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ChatOptions(seq_len=32, long_rows="cut")  # golden.BASE's train.seq_len
    prepare_chat([root / "chat.jsonl"], root / "data", folder, opts)
    return root / "data"


@pytest.fixture(scope="module")
def variant(tmp_path_factory) -> list[str]:
    data = chat_dir(tmp_path_factory.mktemp("chat"))
    return ["data=tokens", f"data.path={data}", "data.document_mask=true"]


def _rank_layouts(rank: int, world: int, port: int, runs: list[list[str]], out: str) -> None:
    """Trains each run's overrides in turn in one process group; rank 0 saves what `run_layout` returns."""
    local_rank_env(rank, world, port)
    results = []
    for i, overrides in enumerate(runs):
        trainer = make_trainer(compose([*overrides, f"run.dir={out}.{i}"]))
        initial = full_state_dict(trainer.pm)
        history = trainer.fit()
        facts = [None] * world
        dist.all_gather_object(facts, layout_facts(trainer))
        results.append({"history": history, "initial": initial, "state": full_state_dict(trainer.pm), "layout": facts})
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def test_counted_targets_differ_between_micro_batches_and_ranks(variant):
    """What makes the golden case below discriminating: uneven counts in every step."""
    cfg = compose([*golden.BASE, *variant])
    t = cfg.train
    data = build_data(cfg.data, t.seq_len, t.seed, cfg.model.vocab_size)
    for step in range(t.steps):
        counted = (data.batch(step, t.batch_size)[1] != IGNORE).view(t.micro_batches, 2, -1).sum(-1)
        assert 0 < counted.sum() < t.batch_size * t.seq_len
        assert counted.unique().numel() > 1, f"step {step}: every micro-batch and rank counts {counted.tolist()}"


@pytest.mark.multiproc
@pytest.mark.timeout(600)
def test_masked_layouts_train_like_one_process(variant, tmp_path, tmp_path_factory):
    ref = golden.reference(variant, tmp_path_factory)
    runs = [[*golden.BASE, *variant, *layout] for _, _, layout, _ in LAYOUTS]
    out = str(tmp_path / "got.pt")
    spawn(_rank_layouts, (2, free_port(), runs, out), 2)
    for (name, world, _, _), overrides, got in zip(LAYOUTS, runs, torch.load(out, weights_only=True), strict=True):
        assert len(got["history"]) == 5, name
        golden.assert_layout_applied(overrides, world, got)
        golden.assert_same_training(ref, got)
