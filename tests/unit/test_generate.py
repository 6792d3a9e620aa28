"""`moeyard generate` and `moeyard eval`: a checkpoint (or HF directory) loaded into one process, sampled and scored.

Checks, on tiny models built here (no hub): greedy tokens from a run's checkpoint and from its export equal
transformers' `generate(do_sample=False)` on the exported model, and a `--chat` prompt is rendered and continued
as transformers' `apply_chat_template` + `generate` do; sampling is a function of the seed, keeps only the nucleus
and follows softmax(logits / temperature) (hand-made logits); `moeyard eval` on the run's data and on its token
directory equals the trainer's own eval loss at the checkpoint's step; bad input is one line and exit 2.

Run: .venv/bin/pytest -q tests/unit/test_generate.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import TopPLogitsWarper

from moeyard.interop.evaluate import held_out
from moeyard.interop.generate import BYTES, Sampling, generate, load_checkpoint_model, load_hf_model, nucleus, pick
from moeyard.interop.hf import export, hydra_overrides, read_hf_config
from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose, write_resolved
from moeyard.launch.cli import main
from moeyard.train.data import stdlib_files
from tests.helpers import make_trainer
from tests.unit.test_chat import QWEN, byte_level_bpe
from tests.unit.test_hf_families import import_overrides, save_tiny

NEW_TOKENS = 10
PROMPT = "def main(argv):\n    "
LOGIT_AGREEMENT = 1e-4
"""Our logits equal transformers' on an exported model within this (test_hf_families; measured 2e-6 to 8e-6)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny Qwen3-MoE imported from transformers, trained 2 steps on a byte token directory with a checkpoint
    and an eval at step 2, and exported: the run dir, the export, the token dir and the logged eval loss."""
    root = tmp_path_factory.mktemp("generate")
    save_tiny("qwen3_moe", root / "hf")
    prepare(stdlib_files(20), root / "tokens")
    run = root / "run"
    overrides = [*import_overrides(root / "hf"), "train.seq_len=32", "profiling=off", "train.steps=2"]
    overrides += ["train.eval_every=2", "checkpoint.enabled=true", "data.source=tokens"]
    cfg = compose([*overrides, f"data.path={root / 'tokens'}", f"run.dir={run}"])
    write_resolved(cfg, run)  # as `moeyard train` does: the run's config.yaml
    history = make_trainer(cfg).fit()
    export(run, root / "out")
    return {"run": run, "out": root / "out", "tokens": root / "tokens", "eval_loss": history[-1]["eval_loss"]}


def transformers_greedy(hf_dir: Path, prompt_ids: list[int]) -> list[int]:
    """transformers' greedy tokens after `prompt_ids` (no stop token: exactly NEW_TOKENS)."""
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    model.generation_config.eos_token_id = None
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids) :].tolist()


def smallest_margin(model, ids: list[int], n_new: int) -> float:
    """The smallest gap between the two largest logits over the last `n_new` choices of the sequence `ids`."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -n_new - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).min())


def hf_model(hf_dir: Path):
    cfg = compose(hydra_overrides(read_hf_config(hf_dir, "generate")))
    return load_hf_model(hf_dir, cfg.model, cfg.moe, "generate", torch.device("cpu"))


def test_greedy_equals_transformers_generate(trained, capsys):
    """From the run's checkpoint and from its export alike; the CLI prints the same continuation."""
    prompt_ids = BYTES.encode(PROMPT)
    theirs = transformers_greedy(trained["out"], prompt_ids)
    ours, _, meta = load_checkpoint_model(trained["run"], "generate", torch.device("cpu"))
    assert meta["step"] == 2
    got = generate(ours, prompt_ids, NEW_TOKENS)
    # Greedy equality is well posed only where the two best logits are further apart than the models agree.
    assert smallest_margin(ours, prompt_ids + got, NEW_TOKENS) > 10 * LOGIT_AGREEMENT
    assert got == theirs, (got, theirs)
    assert generate(hf_model(trained["out"]), prompt_ids, NEW_TOKENS) == theirs
    argv = ["generate", str(trained["run"]), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS)]
    assert main(argv) == 0  # the run's tokenizer: its token directory's, bytes
    assert capsys.readouterr().out == BYTES.decode(theirs) + "\n"


def test_chat_prompt_and_continuation_equal_transformers(tmp_path, capsys):
    """--chat renders the prompt as one user message with the tokenizer's template (transformers'
    apply_chat_template with the generation prompt) and continues it as transformers' greedy generate."""
    folder = byte_level_bpe(tmp_path / "tok", QWEN, eos="<|endoftext|>")
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    save_tiny("qwen3_moe", tmp_path / "hf", vocab_size=max(vocab.values()) + 16)  # room for the special tokens
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / file).write_text((folder / file).read_text())
    question = "What is the capital of France?"
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    messages = [{"role": "user", "content": question}]
    prompt_ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    theirs = transformers_greedy(tmp_path / "hf", prompt_ids)
    ours = hf_model(tmp_path / "hf")
    got = generate(ours, prompt_ids, NEW_TOKENS)
    assert smallest_margin(ours, prompt_ids + got, NEW_TOKENS) > 10 * LOGIT_AGREEMENT
    assert got == theirs
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    shown = theirs[: theirs.index(eos)] if eos in theirs else theirs
    argv = ["generate", str(tmp_path / "hf"), "--chat", "--prompt", question, "--max-new-tokens", str(NEW_TOKENS)]
    assert main(argv) == 0
    assert capsys.readouterr().out == tok.decode(shown, skip_special_tokens=True) + "\n"


# --- sampling on hand-made logits ------------------------------------------------------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def fixed_logits(tokens: torch.Tensor) -> torch.Tensor:
    """A 'model' whose next-token distribution is PROBS at every position."""
    return PROBS.log().expand(*tokens.shape, len(PROBS))


def frequencies(sampling: Sampling, n: int = 4000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(sampling.seed)
    picks = torch.tensor([pick(PROBS.log(), sampling, generator) for _ in range(n)])
    return torch.bincount(picks, minlength=len(PROBS)).double() / n


def assert_follows(freq: torch.Tensor, want: torch.Tensor, n: int = 4000) -> None:
    """Within 5 standard deviations of a binomial count per token (a false failure has odds below 1e-6)."""
    sd = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * sd + 1e-12).all(), (freq, want)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    assert torch.allclose(nucleus(PROBS, 0.7), torch.tensor([0.625, 0.375, 0, 0]))  # 0.5 + 0.3 reach 0.7
    assert torch.allclose(nucleus(PROBS, 0.4), torch.tensor([1.0, 0, 0, 0]))  # the first always stays
    assert torch.allclose(nucleus(PROBS, 1.0), PROBS)
    g = torch.Generator().manual_seed(0)
    for top_p in (0.3, 0.6, 0.9):  # the tokens transformers' top-p warper keeps, on random distributions
        logits = torch.randn(1, 50, generator=g) * 2
        theirs = TopPLogitsWarper(top_p)(torch.zeros(1, 1, dtype=torch.int64), logits.clone()).isfinite()[0]
        assert torch.equal(nucleus(torch.softmax(logits[0], 0), top_p) > 0, theirs), top_p


def test_sampling_follows_temperature_and_top_p_and_the_seed():
    nucleus_only = frequencies(Sampling(temperature=1.0, top_p=0.7, seed=3))
    assert nucleus_only[2:].sum() == 0
    assert_follows(nucleus_only, torch.tensor([0.625, 0.375, 0, 0]).double())
    sharpened = PROBS.double() ** 2 / (PROBS.double() ** 2).sum()  # softmax(log p / 0.5)
    assert_follows(frequencies(Sampling(temperature=0.5, seed=4)), sharpened)
    one = generate(fixed_logits, [1], 40, Sampling(temperature=1.0, seed=7))
    assert one == generate(fixed_logits, [1], 40, Sampling(temperature=1.0, seed=7))
    assert one != generate(fixed_logits, [1], 40, Sampling(temperature=1.0, seed=8))
    assert generate(fixed_logits, [1], 5) == [0] * 5  # greedy: the most likely, whatever the seed
    assert generate(fixed_logits, [1], 5, eos_id=0) == [0]  # stops after the separator


# --- eval ------------------------------------------------------------------------------------------------------


def run_eval(capsys, *argv: str) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_equals_the_trainers_eval_loss(trained, capsys):
    """Same weights and the same windows computed the same way: equal to fp32 summation-order noise."""
    for argv in ([], ["--data", str(trained["tokens"])]):
        got = run_eval(capsys, str(trained["run"]), *argv)
        assert got["step"] == 2 and got["batches"] == 4
        assert math.isclose(got["loss"], trained["eval_loss"], rel_tol=1e-6), (got, trained["eval_loss"])
        assert math.isclose(got["perplexity"], math.exp(trained["eval_loss"]), rel_tol=1e-5)
    whole = run_eval(capsys, str(trained["run"]), "--data", str(trained["tokens"]), "--split", "all", "--batches", "2")
    assert whole["batches"] == 2 and whole["loss"] != got["loss"]


def test_split_all_holds_out_every_token(trained):
    cfg = compose([f"data.path={trained['tokens']}", "data.source=tokens", "train.seq_len=32"])
    data = held_out(cfg.data, str(trained["tokens"]), "all", cfg.train, 256)
    tail = held_out(cfg.data, str(trained["tokens"]), "val", cfg.train, 256)
    assert len(data.train) == 0 and len(data.val) == len(tail.train) + len(tail.val)


# --- refusals --------------------------------------------------------------------------------------------------


def refused(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moeyard: "), err
    return err


def test_refusals_are_one_line(trained, tmp_path, capsys):
    run, out = str(trained["run"]), str(trained["out"])
    assert "holds no complete checkpoint" in refused(capsys, "generate", str(tmp_path), "--prompt", "x")
    assert "--temperature=-1.0 must be >= 0" in refused(capsys, "generate", run, "--prompt", "x", "--temperature", "-1")
    assert "--top-p=0.0 must be in (0, 1]" in refused(capsys, "generate", run, "--prompt", "x", "--top-p", "0")
    assert "--prompt is empty" in refused(capsys, "generate", run, "--prompt", "")
    err = refused(capsys, "generate", run, "--prompt", "x", "--max-new-tokens", "100000")
    assert "exceed model.max_seq_len=" in err
    assert "--chat needs a tokenizer.json" in refused(capsys, "generate", run, "--prompt", "x", "--chat")
    assert "has no tokenizer.json" in refused(capsys, "generate", out, "--prompt", "x")
    assert "--split=some must be one of val, all" in refused(capsys, "eval", run, "--split", "some")
    assert "--split=all needs --data DIR" in refused(capsys, "eval", run, "--split", "all")
    assert "--batches=0 must be >= 1" in refused(capsys, "eval", run, "--batches", "0")
    assert "lacks meta.json or tokens.bin" in refused(capsys, "eval", run, "--data", str(tmp_path))
