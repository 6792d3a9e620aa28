"""GLM-4.5's partial rotary embedding and presets.

RoPE with model.partial_rotary_factor < 1 rotates the first share of each head and leaves the rest as it was;
a factor that leaves no even rotary width, or one set with MLA, is refused naming the field. (Its logits
against transformers' GLM, both directions: tests/unit/test_hf_families.py; under tp2*ep2 and pp2:
tests/multiproc/test_hf.py.)

The GLM-4.5 presets have the published shapes: on the meta device their parameter counts equal the ones
worked out by hand from the published config.json fields, and those give the published totals.

GLM's published figures (GLM-4.5: 355 B total, 32 B active; GLM-4.5-Air: 106 B, 12 B) are whole billions, the
active ones without the input embedding (a lookup). The Air's total is its main model's 106.85 B, truncated;
GLM-4.5's main model is 352.8 B and its one multi-token-prediction layer (which moeyard does not build) adds
4.0 B: 356.8 B, 0.5% above the published 355 B, a figure GLM rounds loosely (its checkpoint, holding copies of
the embedding and head beside that layer, has 358.3 B).

Run: .venv/bin/pytest -q tests/unit/test_glm.py
"""

from __future__ import annotations

import re

import pytest
import torch

from moeyard.interop.hf import check_exportable
from moeyard.job.compose import compose
from moeyard.moe.attention import apply_rope, rope_table
from moeyard.moe.config import ModelConfig
from moeyard.moe.model import Transformer


def test_partial_rotary_rotates_the_first_channels_only() -> None:
    """Heads of 24 channels under a table of 6 pairs (factor 0.5): channels 0-11 are rotated as a 12-wide
    head would be, 12-23 pass unchanged; the rotation is real (position 5's channels 0-11 moved)."""
    cfg = ModelConfig(dim=96, n_heads=4, partial_rotary_factor=0.5)
    assert (cfg.head_dim, cfg.rope_dim) == (24, 12)
    x = torch.randn(2, 8, 4, 24)
    table = rope_table(cfg.rope_dim, 8, cfg.rope_theta)
    out = apply_rope(x, table)
    assert torch.equal(out[..., :12], apply_rope(x[..., :12].contiguous(), table))
    assert torch.equal(out[..., 12:], x[..., 12:])
    assert (out[:, 5, :, :12] - x[:, 5, :, :12]).abs().max() > 0.1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(partial_rotary_factor=0.0), "model.partial_rotary_factor=0.0 must be in (0, 1]"),
        (dict(partial_rotary_factor=1.5), "model.partial_rotary_factor=1.5 must be in (0, 1]"),
        (dict(partial_rotary_factor=0.125, dim=96), "rotate an even number >= 2 of head_dim=24 channels"),
        (dict(attention="mla", partial_rotary_factor=0.5), "model.partial_rotary_factor=0.5 must be 1 with model"),
    ],
)
def test_bad_partial_rotary_is_refused_naming_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**fields).check()


GLM = {  # the published config.json fields that set the parameter count
    "glm4_5_air": dict(V=151552, D=4096, layers=46, dense=1, H=96, G=8, hd=128, ffn=10944, E=128, F=1408, qk_norm=0),
    "glm4_5": dict(V=151552, D=5120, layers=92, dense=3, H=96, G=8, hd=128, ffn=12288, E=160, F=1536, qk_norm=1),
}
TOP_K = 8


def by_hand(V, D, layers, dense, H, G, hd, ffn, E, F, qk_norm) -> dict[str, int]:
    """Counts from the config fields: attention with q/k/v biases (and per-head q/k norms), SwiGLU FFNs of
    three [D, width] matrices, one shared expert of width F, a router [E, D] (its selection bias is a buffer),
    two norms a block, the final norm, an untied embedding and head."""
    attention = D * H * hd + H * hd + 2 * (D * G * hd + G * hd) + H * hd * D + 2 * hd * qk_norm
    moe_block = attention + 3 * D * F * (E + 1) + E * D + 2 * D
    dense_block = attention + 3 * D * ffn + 2 * D
    total = dense * dense_block + (layers - dense) * moe_block + D + 2 * V * D
    idle = (layers - dense) * (E - TOP_K) * 3 * D * F
    mtp = moe_block + 2 * D * D + 3 * D  # eh_proj [D, 2D], enorm, hnorm, its head's norm
    return {"total": total, "active": total - idle - V * D, "mtp": mtp}


@pytest.mark.parametrize("preset", list(GLM))
def test_glm_presets_count_the_published_parameters(preset: str) -> None:
    cfg = compose([f"model={preset}"])
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    want = by_hand(**GLM[preset])
    assert sum(p.numel() for p in model.parameters()) == want["total"]
    if preset == "glm4_5_air":
        assert (int(want["total"] / 1e9), int(want["active"] / 1e9)) == (106, 12)
    else:
        assert int(want["active"] / 1e9) == 32
        assert round((want["total"] + want["mtp"]) / 1e9, 1) == 356.8  # published 355 (module docstring)
    assert check_exportable(cfg.model, cfg.moe).title == "GLM-4.5-MoE"
