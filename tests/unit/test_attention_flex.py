"""FlexAttention (model.attn_impl=flex, and auto's choice on CUDA) against plain SDPA, in fp32 on CPU:

- outputs and gradients of `attend` equal SDPA's for causal, packed documents, GQA, GQA with documents, and
  MLA's unequal q/k and v widths with documents, at a length that is not a multiple of the 128-token tile;
- the BlockMask visits exactly the tiles where the dense block-causal mask allows something, marks full
  exactly those where it allows everything, and broadcasts over heads (and over rows without documents);
- the kernel each (attn_impl, device, dtype, documents, GQA, head widths) gets, as a table;
- SDPA limited to its fused kernels raises on a call only the math kernel takes (MLA's widths on CPU);
- model.attn_impl=flex with train.device=cpu is refused before training (no FlexAttention backward on CPU);
- a short training run with data.document_mask=true and GQA loses exactly what the SDPA run loses, and
  builds the BlockMask once per micro-batch for all layers.

torch (2.11 to 2.13) refuses FlexAttention inputs that require grad on CPU, before any kernel runs (its
`_validate_device`). Outputs go through the public `flex_attention`; gradients through the operator it calls,
`flex_attention_hop`, run eagerly, which is the same math (`flex_with_cpu_grad`, patched in by the tests that
need gradients).

Tolerance (`fp32_tolerance`): every output is the end of a chain of fp32 reductions: q.k over Hd channels,
the softmax normaliser and p.v over at most S keys; the backward adds dO.v over Vd and sums over S for dq, dk
and dv. Rounding errors of a length-n sum grow like a random walk, sqrt(n) u relative to the largest magnitude
summed (u = 2^-24; Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 4.2); the chain's
errors add in quadrature, sqrt(Hd + Vd + 3 S) u. Each implementation carries its own (x2), bounded at four
standard deviations (x4): |flex - sdpa| <= 8 u sqrt(Hd + Vd + 3 S) max|sdpa|, per tensor. A wrong mask, head
mapping or scale moves outputs by O(1) of that maximum.

Run: .venv/bin/pytest -q tests/unit/test_attention_flex.py
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch._higher_order_ops.flex_attention import flex_attention as flex_attention_hop
from torch.nn.attention.flex_attention import BlockMask

import moeyard.moe.attention as attention_module
from moeyard.interop.prepare import prepare
from moeyard.job.compose import compose
from moeyard.job.schema import ConfigError
from moeyard.launch.validate import validate
from moeyard.moe.attention import attend, attention_kernel, attention_mask, fused_sdpa
from moeyard.moe.config import ModelConfig
from moeyard.moe.masking import block_causal_mask, flex_block_mask
from moeyard.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
"""Eager FlexAttention is the CPU reference here; its advice to compile is for real runs."""

B, S, H = 2, 200, 4
"""S = 200: one whole 128-token tile and one padded one."""


def fp32_tolerance(head_dim: int, v_dim: int, seq_len: int) -> float:
    """The bound of the module docstring, relative to the largest magnitude of the SDPA tensor."""
    u = torch.finfo(torch.float32).eps / 2
    return 8 * u * math.sqrt(head_dim + v_dim + 3 * seq_len)


def assert_within(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    err, top = float((got - want).abs().max()), float(want.abs().max())
    assert err <= tol * top, f"{what}: max error {err:.3g} > {tol:.3g} x max {top:.3g}"


def flex_with_cpu_grad(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """torch's flex_attention without its CPU refusal of inputs that require grad: the operator it runs, eagerly
    (GQA from the head counts, as flex_attention does with enable_gqa)."""
    assert enable_gqa == (q.shape[1] != k.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    identity = lambda score, b, h, q_idx, kv_idx: score
    return flex_attention_hop(q, k, v, identity, block_mask.as_tuple(), scale, {})[0]


def packed_documents(rows: int, seq_len: int, seed: int) -> torch.Tensor:
    """Document ids [rows, seq_len] of documents a few tens of tokens long, a different cut in each row."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(rows, seq_len, generator=g) < 0.04).cumsum(1)


CASES = {  # name: (kv heads, q/k width, v width, documents)
    "causal": (H, 16, 16, False),
    "documents": (H, 16, 16, True),
    "gqa": (2, 16, 16, False),
    "gqa+documents": (2, 16, 16, True),
    "mla+documents": (H, 24, 16, True),
}


@pytest.mark.parametrize("case", CASES)
def test_flex_equals_sdpa_outputs_and_gradients(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    G, qk, vd, documents = CASES[case]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, S, heads, width, generator=g) for heads, width in ((H, qk), (G, qk), (G, vd)))
    doc = packed_documents(B, S, seed=1) if documents else None
    dense = block_causal_mask(doc) if documents else None
    block = flex_block_mask(doc, S, q.device)
    tol = fp32_tolerance(qk, vd, S)

    assert_within(attend(q, k, v, block), attend(q, k, v, dense), tol, "output (public flex_attention)")

    monkeypatch.setattr(attention_module, "flex_attention", flex_with_cpu_grad)
    grad_out = torch.randn(B, S, H, vd, generator=g)
    results = []
    for mask in (block, dense):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attend(*leaves, mask)
        results.append((out, *torch.autograd.grad(out, leaves, grad_out)))
    for name, got, want in zip(("output", "dq", "dk", "dv"), *results, strict=True):
        assert_within(got, want, tol, name)


@pytest.mark.parametrize("documents", [True, False], ids=["documents", "causal"])
def test_block_mask_tiles_match_the_dense_mask(documents: bool) -> None:
    """Tiles of 128 x 128: visited iff the dense mask allows some pair in it, full iff it allows all."""
    rows, seq, tile = 3, 512, 128
    long = (torch.arange(seq) >= 300).long()  # documents of 300 and 212 tokens: full tiles and skipped ones
    one = torch.zeros(seq, dtype=torch.long)  # one document: the causal mask
    doc = torch.stack([long, packed_documents(1, seq, seed=2)[0], one]) if documents else None
    block = flex_block_mask(doc, seq, torch.device("cpu"))
    assert block.shape == ((rows if documents else 1), 1, seq, seq)  # heads broadcast; rows too without documents
    allowed = block_causal_mask(doc) if documents else torch.ones(1, 1, seq, seq, dtype=torch.bool).tril()
    tiles = allowed.unflatten(2, (-1, tile)).unflatten(4, (-1, tile))  # [B, 1, nQ, tile, nKV, tile]
    some, every = tiles.any(dim=(3, 5)), tiles.all(dim=(3, 5))
    assert torch.equal(block.to_dense().bool(), some)
    full = _tiles(block.full_kv_num_blocks, block.full_kv_indices)
    assert torch.equal(full, every)
    assert every.sum() > 0 and (~some).sum() > 0  # the shapes exercise both full and skipped tiles


def _tiles(num_blocks: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """bool [B, H, nQ, nKV]: for each query tile, its first num_blocks kv tiles of `indices`."""
    listed = torch.arange(indices.shape[-1]) < num_blocks[..., None]
    out = torch.zeros(indices.shape, dtype=torch.bool)
    return out.scatter_(-1, indices.long(), listed)


BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize(
    ("impl", "device", "dtype", "documents", "gqa", "qk", "vd", "flash_installed", "kernel"),
    [
        ("auto", "cpu", FP32, True, True, 64, 64, False, "sdpa"),  # off CUDA: today's path
        ("auto", "cuda", BF16, False, False, 128, 128, False, "sdpa"),  # flash
        ("auto", "cuda", BF16, False, True, 128, 128, False, "sdpa"),  # flash takes GQA
        ("auto", "cuda", BF16, True, False, 128, 128, False, "flex"),  # documents
        ("auto", "cuda", BF16, True, True, 128, 128, False, "flex"),
        ("auto", "cuda", FP32, False, True, 128, 128, False, "flex"),  # no fused kernel takes GQA in fp32
        ("auto", "cuda", BF16, False, True, 512, 512, False, "flex"),  # too wide for flash
        ("auto", "cuda", BF16, False, False, 192, 128, False, "sdpa"),  # MLA: memory-efficient
        ("auto", "cuda", BF16, True, False, 192, 128, False, "flex"),  # MLA with documents
        ("flash", "cuda", BF16, False, True, 128, 128, True, "flash_attn"),
        ("flash", "cuda", BF16, False, True, 128, 128, False, "sdpa"),  # not installed: as auto
        ("flash", "cuda", BF16, True, True, 128, 128, True, "flex"),  # flash-attn's dense call takes no mask
        ("flash", "cuda", BF16, False, False, 192, 128, True, "sdpa"),  # nor unequal widths
        ("flash", "cpu", BF16, False, False, 64, 64, True, "sdpa"),
        ("sdpa", "cuda", BF16, True, True, 128, 128, False, "sdpa"),  # asked for: refused by torch if no fit
        ("flex", "cpu", FP32, False, False, 64, 64, False, "flex"),
    ],
)
def test_kernel_choice(impl, device, dtype, documents, gqa, qk, vd, flash_installed, kernel, monkeypatch) -> None:
    monkeypatch.setattr(attention_module, "flash_attn_func", object() if flash_installed else None)
    assert attention_kernel(impl, device, dtype, documents, gqa, qk, vd) == kernel


def test_attention_mask_follows_the_kernel() -> None:
    """One mask per micro-batch in the kernel's form: BlockMask for flex, dense with documents, else None."""
    x = torch.zeros(B, S, 32)
    doc = packed_documents(B, S, seed=3)
    flex, auto = ModelConfig(dim=32, attn_impl="flex"), ModelConfig(dim=32, attn_impl="auto")  # auto on CPU: SDPA
    assert isinstance(attention_mask(flex, doc, x), BlockMask) and isinstance(attention_mask(flex, None, x), BlockMask)
    assert torch.equal(attention_mask(auto, doc, x), block_causal_mask(doc))
    assert attention_mask(auto, None, x) is None


def test_fused_sdpa_refuses_what_only_the_math_kernel_takes() -> None:
    """On CPU the fused kernel (flash) takes no value width unlike q/k's: limited to the fused kernels, SDPA
    raises where it would otherwise run the math kernel; a call flash takes runs as plain SDPA does."""
    q, k = torch.randn(1, H, 16, 8), torch.randn(1, H, 16, 8)
    narrow_v, v = torch.randn(1, H, 16, 4), torch.randn(1, H, 16, 8)
    F.scaled_dot_product_attention(q, k, narrow_v, is_causal=True)  # the math kernel takes it
    with pytest.raises(RuntimeError, match="No available kernel"):
        fused_sdpa(q, k, narrow_v, None, None, False)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_within(fused_sdpa(q, k, v, None, None, False), want, fp32_tolerance(8, 8, 16), "fused output")


def test_flex_on_cpu_is_refused_before_training(tmp_path: Path) -> None:
    cfg = compose(["model.attn_impl=flex", "train.device=cpu", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^model.attn_impl=flex needs a GPU: torch has no FlexAttention backward"):
        validate(cfg, 1)


@pytest.fixture(scope="module")
def short_docs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Prepared byte tokens of many short documents, so every 32-token row crosses separators."""
    root = tmp_path_factory.mktemp("docs")
    texts = root / "texts"
    texts.mkdir()
    for i in range(60):
        (texts / f"{i:03d}.txt").write_text(f"doc {i}: " + "abcdefgh"[: 1 + i % 8] * (1 + i % 3))
    prepare([texts], root / "tokens")
    return str(root / "tokens")


def test_training_with_documents_and_gqa_loses_what_sdpa_loses(
    short_docs: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """debug model (4 query heads over 2 kv heads), 2 micro-batches: three steps with FlexAttention give the
    losses of the SDPA run (the golden contract's fp32 tolerance), with one BlockMask per micro-batch forward
    serving every layer. The Trainer is built without `validate`, which refuses flex on CPU: here the patched
    operator supplies the backward torch lacks there."""
    overrides = [
        "model=debug",
        "model.n_layers=2",
        "train.seq_len=32",
        "train.steps=3",
        "train.log_every=1",
        "train.batch_size=4",
        "train.micro_batches=2",
        "train.eval_every=0",
        "profiling=off",
        "data=tokens",
        f"data.path={short_docs}",
        "data.document_mask=true",
    ]
    sdpa = Trainer(compose([*overrides, "model.attn_impl=sdpa", f"run.dir={tmp_path / 'sdpa'}"])).fit()
    calls = {"masks": 0, "flex": 0}

    def counted(fn: Callable, key: str) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[key] += 1
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(attention_module, "flex_attention", counted(flex_with_cpu_grad, "flex"))
    monkeypatch.setattr(attention_module, "flex_block_mask", counted(flex_block_mask, "masks"))
    trainer = Trainer(compose([*overrides, "model.attn_impl=flex", f"run.dir={tmp_path / 'flex'}"]))
    assert trainer.cfg.model.n_kv_heads < trainer.cfg.model.n_heads
    flex = trainer.fit()
    assert [h["loss"] for h in flex] == pytest.approx([h["loss"] for h in sdpa], rel=1e-5)
    assert calls["masks"] == 3 * 2  # steps x micro-batches
    assert calls["flex"] == calls["masks"] * 2  # every layer attends with its micro-batch's one mask
