"""data.document_mask: packed documents stay apart. Two documents packed into one row give the logits and
the loss that each gives alone (positions restart, attention stops at the separator), for grouped-query and
multi-head latent attention; the Trainer feeds the document ids of its own rows to the model; validation
accepts the flag; tp2 with sequence parallelism and pp2 (1F1B and interleaved) train exactly like one
process.
Run: .venv/bin/pytest -q tests/unit/test_document_mask.py  (the tp2 and pp2 runs are marked multiproc)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose
from moeyard.launch.validate import validate
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.model import Transformer, init_weights
from moeyard.train.data import EOS, document_ids
from moeyard.train.trainer import Trainer
from tests.helpers import free_port, run_layout

MLA = dict(attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)


def tiny_model(**attention) -> Transformer:
    shape = dict(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    cfg = ModelConfig(**shape, **attention)
    transformer = Transformer(cfg, MoEConfig(num_experts=4, top_k=2, expert_hidden=16))
    init_weights(transformer, seed=7)
    return transformer.eval()


@pytest.mark.parametrize("attention", [{}, MLA], ids=["gqa", "mla"])
def test_packed_loss_of_two_documents_equals_their_separate_losses(attention: dict) -> None:
    model = tiny_model(**attention)
    first = torch.tensor([3, 9, 4, 11, EOS])  # the separator belongs to the document it ends
    second = torch.tensor([5, 17, 2, 8, 30, 6])
    stream = torch.cat([first, second, torch.tensor([12])])
    packed_x, packed_y = stream[None, :-1], stream[None, 1:]
    doc_ids = document_ids(packed_x, EOS)
    assert doc_ids.tolist() == [[0] * 5 + [1] * 6]
    with torch.no_grad():
        packed = model(packed_x, doc_ids=doc_ids)
        alone = [model(x[None]) for x in (first, second)]
        unmasked = model(packed_x)
    # Each document's logits: the same as when it runs alone from position 0.
    torch.testing.assert_close(packed[:, :5], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 5:], alone[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:, 5:], alone[1], atol=1e-3)  # without the mask the second one differs
    # The packed loss is the token-weighted mean of the two documents' losses (same next-token targets).
    loss = F.cross_entropy(packed[0], packed_y[0])
    losses = [F.cross_entropy(a[0], y, reduction="sum") for a, y in zip(alone, packed_y[0].split([5, 6]), strict=True)]
    torch.testing.assert_close(loss, sum(losses) / 11, rtol=1e-5, atol=1e-6)


def test_rows_without_separator_are_unchanged() -> None:
    """All-one-document rows: the mask is the causal mask and positions are 0..S-1."""
    model = tiny_model()
    x = torch.randint(1, 32, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(x, doc_ids=document_ids(x, EOS)), model(x), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Prepared byte tokens of many short documents, so every 32-token row crosses separators."""
    root = tmp_path_factory.mktemp("docs")
    texts = root / "texts"
    texts.mkdir()
    for i in range(80):
        (texts / f"{i:03d}.txt").write_text(f"doc {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3))
    prepare([texts], root / "tokens")
    return str(root / "tokens")


def doc_overrides(path: str) -> list[str]:
    return [
        "model=debug",
        "model.n_layers=2",
        "train.seq_len=32",
        "train.steps=2",
        "train.log_every=1",
        "train.batch_size=4",
        "profiling=off",
        "train.eval_every=2",
        "train.eval_batches=1",
        "data=tokens",
        f"data.path={path}",
        "data.document_mask=true",
    ]


def test_trainer_feeds_document_ids_and_trains(short_docs: str, tmp_path) -> None:
    """The first step's loss is the document-masked loss of its batch (not the plain causal one); two steps
    and a held-out eval run."""
    cfg = compose([*doc_overrides(short_docs), f"run.dir={tmp_path}"])
    validate(cfg, 1)
    trainer = Trainer(cfg)
    x, y = trainer.data.batch(0, cfg.train.batch_size)
    doc = trainer.data.documents(x)
    assert doc is not None and (doc[:, -1] > 0).all()  # every row holds several documents
    model = trainer.pm.parts[0]
    with torch.no_grad():
        masked = [
            F.cross_entropy(model(a, doc_ids=d).flatten(0, 1), b.flatten())
            for a, b, d in zip(x.chunk(2), y.chunk(2), doc.chunk(2), strict=True)
        ]
        plain = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    for moe in trainer.pm.moe_layers().values():
        moe.drain_stats()  # the forwards above are not the step's
    history = trainer.fit()
    assert [h["step"] for h in history] == [1, 2]
    assert history[0]["loss"] == pytest.approx(float(sum(masked) / 2), rel=1e-6)
    assert abs(history[0]["loss"] - float(plain)) > 1e-4
    assert torch.isfinite(torch.tensor(history[-1]["eval_loss"]))


@pytest.mark.multiproc
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "schedule",
    [["parallel.pp_schedule=1f1b"], ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"]],
    ids=["1f1b", "interleaved"],
)
def test_pp2_trains_like_one_process(short_docs: str, tmp_path, schedule: list[str]) -> None:
    """Every pipeline stage derives its micro-batch's document ids from the tokens each pp rank loads: the
    losses and the eval loss equal one process's masked ones, which differ from the unmasked ones."""
    overrides = [*doc_overrides(short_docs), "model.n_layers=4", "train.micro_batches=2"]
    one = Trainer(compose([*overrides, f"run.dir={tmp_path / 'one'}"])).fit()
    off = Trainer(compose([*overrides, "data.document_mask=false", f"run.dir={tmp_path / 'off'}"])).fit()
    pp = [*overrides, "parallel.pp=2", *schedule, f"run.dir={tmp_path / 'pp2'}"]
    validate(compose(pp), 2)
    result = run_layout(pp, 2, str(tmp_path / "pp2.pt"), free_port())
    got = result["history"]
    assert [h["loss"] for h in got] == pytest.approx([h["loss"] for h in one], rel=1e-5)
    assert got[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)
    assert abs(got[0]["loss"] - off[0]["loss"]) > 1e-4 and abs(got[-1]["eval_loss"] - off[-1]["eval_loss"]) > 1e-4
    stages = len(schedule) * 2  # 1f1b: one stage per rank; interleaved: two
    assert sorted(s for facts in result["layout"] for s in facts["stages"]) == list(range(stages))


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_tp2_sequence_parallel_trains_like_one_process(short_docs: str, tmp_path) -> None:
    """Attention runs on the whole sequence under tp (sequence-parallel slices are gathered before it), and
    each tp rank derives the same document mask from the same tokens: losses equal one process's."""
    overrides = [*doc_overrides(short_docs), "train.eval_every=0"]
    want = [h["loss"] for h in Trainer(compose([*overrides, f"run.dir={tmp_path / 'one'}"])).fit()]
    tp = [*overrides, "parallel.tp=2", "parallel.sequence_parallel=true", f"run.dir={tmp_path / 'tp2'}"]
    result = run_layout(tp, 2, str(tmp_path / "tp2.pt"), free_port())
    got = [h["loss"] for h in result["history"]]
    assert got == pytest.approx(want, rel=1e-5)
    assert any(p[2] == ("tp",) for p in result["layout"][0]["params"].values())
