"""Multi-token prediction (model.mtp_layers, moe/mtp.py): the MTP logits against a reference written from the
DeepSeek-V3 report's equations (section 2.2), the targets each depth counts, the loss lambda / D * sum_k CE_k,
the DeepSeek-V3 Hugging Face layout (export then import, bit for bit; the shared copies checked) and the
published 685 B of the checkpoint.

    .venv/bin/pytest -q tests/unit/test_mtp.py   # ~30 s
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moeyard.interop.hf import check_exportable, export, hydra_overrides, read_hf_config
from moeyard.job.compose import compose
from moeyard.moe.model import Transformer, init_weights
from moeyard.moe.mtp import mtp_targets
from moeyard.parallel.state import full_state_dict
from moeyard.train.data import IGNORE
from tests.helpers import make_trainer

RUN = ["model=debug", "train.seq_len=32", "profiling=off", "train.eval_every=0", "train.log_every=1"]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_mtp_logits(model: Transformer, tokens_BS: torch.Tensor) -> list[torch.Tensor]:
    """The report's equations 21-23 by hand, on sequences of T - k tokens at depth k (no wrap-around):
    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})] (the released weights' order: embedding first),
    h^k = TRM_k(h'^k), P^k = OutHead(RMSNorm(h^k)); h^0 is the main model's output representation (its
    final norm applied, as vLLM and Megatron-Core pass it). Only the blocks are the model's modules."""
    cfg, eps = model.cfg, model.cfg.norm_eps
    S = tokens_BS.shape[1]
    emb_W, head_W = model.tok_embeddings.weight, model.output.weight
    h = emb_W[tokens_BS]
    for i in range(cfg.n_layers):
        h = model.layers[str(i)](h, model.rope)
    h = _rms(h, model.norm.weight, eps)
    out = []
    for k in range(1, cfg.mtp_layers + 1):
        mod = model.mtp[str(cfg.n_layers + k - 1)]
        e = _rms(emb_W[tokens_BS[:, k:]], mod.enorm.weight, eps)
        h = torch.cat([e, _rms(h[:, : S - k], mod.hnorm.weight, eps)], dim=-1) @ mod.eh_proj.weight.T
        h = model.layers[str(cfg.n_layers + k - 1)](h, model.rope)
        out.append(_rms(h, mod.norm.weight, eps) @ head_W.T)
    return out


def test_mtp_logits_follow_the_reports_equations():
    """Dropless routing (each token's output is its own), so the shorter reference sequences give the same
    logits at every position both compute; fp32 rounding of differently ordered sums only."""
    cfg = compose([*RUN, "model.mtp_layers=2", "model.first_dense_layers=1"])
    with torch.no_grad():
        model = Transformer(cfg.model, cfg.moe)
        init_weights(model, 0)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        assert model(tokens).shape == (2, 16, cfg.model.vocab_size)  # generation and eval: the main logits
        got = model(tokens, mtp_tokens=tokens)
        want = reference_mtp_logits(model, tokens)
    S = tokens.shape[1]
    assert got.shape == (2, 3 * S, cfg.model.vocab_size)
    for k, ref in enumerate(want, start=1):
        torch.testing.assert_close(got[:, k * S : k * S + S - k], ref, rtol=1e-5, atol=1e-5)


def test_mtp_targets_leave_out_sequence_ends_and_other_documents():
    y = torch.tensor([[1, 2, 3, 4, 5]])
    docs = torch.tensor([[0, 0, 0, 1, 1]])
    got = mtp_targets(y, 2, docs, IGNORE)
    X = IGNORE
    assert got.tolist() == [[[1, 2, 3, 4, 5], [2, 3, X, 5, X], [3, X, X, X, X]]]
    assert mtp_targets(y, 1, None, IGNORE).tolist() == [[[1, 2, 3, 4, 5], [2, 3, 4, 5, X]]]


def test_mtp_loss_is_the_lm_loss_plus_lambda_over_d_times_each_depths_mean(tmp_path):
    """One micro-batch of a step: the trainer's loss against F.cross_entropy over the positions each depth
    predicts (i < S - k: t_{i+k+1} is y[i + k])."""
    coef, D = 0.25, 2
    cfg = compose([*RUN, f"model.mtp_layers={D}", f"train.mtp_loss_coef={coef}", "train.micro_batches=1",
                   f"run.dir={tmp_path}"])  # fmt: skip
    trainer = make_trainer(cfg)
    x, y, scale = trainer._host_batch(0)
    trainer._scale = scale
    with torch.no_grad():
        logits = trainer.pm.parts[0](x, mtp_tokens=x)
        got = trainer._lm_loss(logits, y)
    S = cfg.train.seq_len
    main_y = y[:, :S]
    want = F.cross_entropy(logits[:, :S].flatten(0, 1), main_y.flatten())
    ce = [F.cross_entropy(logits[:, k * S : k * S + S - k].flatten(0, 1), main_y[:, k:].flatten()) for k in (1, 2)]
    want = want + coef / D * sum(ce)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    trainer._scale = None  # as `evaluate` sets it (no loss mask): main targets only give the LM loss
    with torch.no_grad():
        lm = trainer._lm_loss(logits, main_y)
    torch.testing.assert_close(lm, F.cross_entropy(logits[:, :S].flatten(0, 1), main_y.flatten()), rtol=1e-6, atol=0)


def test_mtp_trains_and_logs_its_loss(tmp_path):
    cfg = compose([*RUN, "model.mtp_layers=1", "train.steps=2", f"run.dir={tmp_path}"])
    history = make_trainer(cfg).fit()
    assert all(math.isfinite(h["mtp_loss"]) and h["mtp_loss"] > 0 for h in history)


def test_bad_mtp_settings_name_the_field():
    with pytest.raises(ValueError, match=r"model.mtp_layers=-1 must be >= 0"):
        compose(["model.mtp_layers=-1"]).model.check()
    with pytest.raises(ValueError, match=r"train.mtp_loss_coef=-0.1 must be >= 0"):
        compose(["train.mtp_loss_coef=-0.1"]).train.check()
    with pytest.raises(ValueError, match=r"model.mtp_layers=1 has no Hugging Face Mixtral equivalent"):
        cfg = compose(["model=debug", "model.mtp_layers=1"])
        check_exportable(cfg.model, cfg.moe)


def _layout_error(overrides: list[str]) -> str:
    from moeyard.job.layout import check_layout
    from moeyard.parallel.dims import ParallelDims

    cfg = compose(overrides)
    with pytest.raises(ValueError) as err:
        check_layout(cfg, ParallelDims.from_config(cfg.parallel, 2))
    return str(err.value)


def test_layout_refuses_mtp_with_sequence_parallelism():
    msg = _layout_error(["model.mtp_layers=1", "parallel.tp=2", "parallel.sequence_parallel=true"])
    assert msg == "model.mtp_layers=1 is not supported with parallel.sequence_parallel"


# --- DeepSeek-V3's Hugging Face layout -------------------------------------------------------------------------

DEEPSEEK = [
    "model=deepseek_v3", "moe=deepseek", "model.vocab_size=256", "model.dim=64", "model.n_layers=2",
    "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_hidden=96", "model.max_seq_len=128",
    "model.first_dense_layers=1", "model.q_lora_rank=16", "model.kv_lora_rank=16", "model.qk_rope_head_dim=8",
    "model.qk_nope_head_dim=8", "model.v_head_dim=12", "moe.num_experts=8", "moe.top_k=2", "moe.expert_hidden=32",
    "moe.num_shared_experts=1", "moe.n_groups=4", "moe.topk_groups=2", "moe.bias_update_rate=0.01",
    "model.mtp_layers=1",
]  # fmt: skip


def _hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def test_deepseek_v3_mtp_round_trips_bit_for_bit(tmp_path):
    """Two trained steps export as DeepSeek-V3 with the MTP layer (model.layers.2: enorm, hnorm, eh_proj,
    shared_head.norm, its block, and the embedding's and head's copies); importing that directory gives
    every tensor back bit for bit (fp32 export), and exporting it again writes the same tensors. A copy that
    differs from the shared tensor is refused."""
    run = tmp_path / "run"
    cfg = compose([*DEEPSEEK, *RUN[1:], "train.steps=2", "checkpoint.enabled=true", f"run.dir={run}"])
    trainer = make_trainer(cfg)
    trainer.fit()
    ours = full_state_dict(trainer.pm)
    export(run, tmp_path / "hf")
    hf = _hf_tensors(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1
    for key in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "self_attn.kv_a_proj_with_mqa", "mlp.gate"):
        assert f"model.layers.2.{key}.weight" in hf, key
    assert torch.equal(hf["model.layers.2.embed_tokens.weight"], hf["model.embed_tokens.weight"])
    assert torch.equal(hf["model.layers.2.shared_head.head.weight"], hf["lm_head.weight"])
    assert torch.equal(hf["model.layers.2.hnorm.weight"], ours["mtp.2.hnorm.weight"])

    overrides = hydra_overrides(read_hf_config(tmp_path / "hf", "import"))
    assert "model.mtp_layers=1" in overrides
    back_cfg = compose([*overrides, *RUN[1:], f"train.init_from={tmp_path / 'hf'}", f"run.dir={tmp_path / 'b'}"])
    back = full_state_dict(make_trainer(back_cfg).pm)
    assert back.keys() == ours.keys()
    differ = [n for n in ours if not torch.equal(back[n], ours[n])]
    assert not differ, differ

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    hf["model.layers.2.embed_tokens.weight"] = hf["model.layers.2.embed_tokens.weight"] + 1
    save_file(hf, str(bad / "model.safetensors"))
    bad_cfg = compose([*overrides, *RUN[1:], f"train.init_from={bad}", f"run.dir={tmp_path / 'c'}"])
    with pytest.raises(ValueError, match="model.layers.2.embed_tokens.weight differs from model.embed_tokens"):
        make_trainer(bad_cfg)


def test_import_without_the_mtp_weights_builds_no_mtp_module(tmp_path):
    """transformers' save_pretrained drops the MTP layers and keeps num_nextn_predict_layers: import then
    builds none (there are no weights to start them from)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    config = {**_deepseek_config(), "num_nextn_predict_layers": 1}
    (hf / "config.json").write_text(json.dumps(config))
    save_file({"model.embed_tokens.weight": torch.zeros(256, 64)}, str(hf / "model.safetensors"))
    assert "model.mtp_layers=0" in hydra_overrides(read_hf_config(hf, "import"))


def _deepseek_config() -> dict:
    from moeyard.interop.hf import hf_config

    cfg = compose(DEEPSEEK)
    return hf_config(cfg.model, cfg.moe, "float32")


# --- the published count ----------------------------------------------------------------------------------------


def _fp8_scales(name: str, shape: torch.Size) -> int:
    """Elements of the fp32 `_scale_inv` beside a block-quantised (128 x 128) weight of the published
    checkpoint: every Linear of the blocks but the router (and the MTP projection); none for norms, the
    embedding and the head (interop/fp8.py)."""
    if len(shape) == 1 or name in ("tok_embeddings.weight", "output.weight"):
        return 0
    if name.endswith(("router.gate.weight", "eh_proj.weight")):
        return 0
    *experts, rows, cols = shape  # an expert stack [E, D, F] is E weights [F, D]
    per = math.ceil(rows / 128) * math.ceil(cols / 128)
    return per * (experts[0] if experts else 1)


def test_deepseek_v3_with_one_mtp_module_counts_the_published_685b():
    """The Hugging Face checkpoint's 685 B counts every tensor it stores: our parameters with one MTP module,
    the MTP layer's copies of the embedding and head, the aux-free biases and the fp8 block scales. Within
    half the last published digit. (Without MTP the main model is the published 671 B: test_model.py.)"""
    cfg = compose(["model=deepseek_v3", "model.mtp_layers=1"])
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    params = dict(model.named_parameters())
    copies = 2 * cfg.model.vocab_size * cfg.model.dim
    biases = len(model.moe_layers()) * cfg.moe.num_experts
    scales = sum(_fp8_scales(n, p.shape) for n, p in params.items())
    total = sum(p.numel() for p in params.values()) + copies + biases + scales
    assert abs(total / 1e9 - 685) <= 0.5, total
    print(f"deepseek_v3 with one MTP module: {total / 1e9:.3f} B stored")


def test_flops_formula_counts_the_mtp_modules():
    """profiling/flops.py (MFU) against torch's FlopCounterMode on a forward + backward: what one MTP module
    adds, its block (dense here: layer 3 with moe_every=2), projection and pass through the head, as
    tests/unit/test_flops.py checks the rest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from moeyard.profiling.flops import train_flops_per_token
    from tests.helpers import flop_counter

    def counted_and_formula(depth: int) -> tuple[int, int]:
        cfg = compose(["model=debug", "model.n_layers=3", "model.moe_every=2", f"model.mtp_layers={depth}"])
        model = Transformer(cfg.model, cfg.moe)
        init_weights(model, 0)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        counter = flop_counter()
        with counter, sdpa_kernel(SDPBackend.MATH):
            model(tokens, mtp_tokens=tokens if depth else None).float().sum().backward()
        return counter.get_total_flops(), train_flops_per_token(cfg.model, cfg.moe, 32) * 2 * 32

    (without, formula_without), (with_mtp, formula_with) = counted_and_formula(0), counted_and_formula(1)
    assert with_mtp - without == formula_with - formula_without > 0
