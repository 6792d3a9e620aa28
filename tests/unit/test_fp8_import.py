"""Block-quantised FP8 checkpoints (DeepSeek-V3's and Kimi-K2's published form) import dequantised.

A tiny random DeepSeek-V3 from transformers, its Linear weights quantised the published way (per 128 x 128
block, ragged at the edges: scale = amax / 448, stored float8 e4m3 beside `<name>_scale_inv`), imports with
exactly the weights of the dequantised reference checkpoint, and transformers on that reference gives our
logits. A box of a weight (a rank's tensor- or expert-parallel slice, cut across a block boundary) reads
only its own fp8 elements and the scale blocks it overlaps. Kimi-K2's published config.json maps as
DeepSeek-V3's architecture. No hub access, CPU, fp32.

Run: .venv/bin/pytest -q tests/unit/test_fp8_import.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import moeyard.interop.hf as train_hf
from moeyard.interop.hf import SafetensorsReader, TensorMap, hydra_overrides, overrides_from_hf, read_hf_config
from moeyard.interop.hf_families import FAMILIES
from moeyard.job.compose import compose
from moeyard.moe.model import Transformer
from moeyard.parallel.state import full_state_dict
from tests.helpers import make_trainer, slice_only_safe_open
from tests.unit.test_hf_families import RUN, import_overrides, logits_diff, save_tiny

BLOCK = (128, 128)
QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(BLOCK)}
# Wide enough that weights span several blocks, ragged at the edge: 192 = 128 + 64 columns, 160 rows.
WIDE = dict(hidden_size=192, intermediate_size=160, moe_intermediate_size=32)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3 weight, fp32 scale_inv) of the 2-D `w`, the published way: each block scaled so that its
    largest magnitude becomes e4m3's largest finite value, 448."""
    rows, cols = w.shape
    br, bc = BLOCK
    padded = torch.zeros(-(-rows // br) * br, -(-cols // bc) * bc)
    padded[:rows, :cols] = w
    blocks = padded.unflatten(0, (-1, br)).unflatten(2, (-1, bc))  # [row blocks, br, col blocks, bc]
    scale = blocks.abs().amax(dim=(1, 3)) / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale[:, None, :, None]).flatten(2).flatten(0, 1)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale


def dequantized(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference: each element times its block's scale, indexed element by element (no block expansion)."""
    rows, cols = q.shape
    return q.float() * scale[torch.arange(rows)[:, None] // BLOCK[0], torch.arange(cols)[None, :] // BLOCK[1]]


def is_quantised(name: str, t: torch.Tensor) -> bool:
    """DeepSeek-V3's published choice: every Linear weight of the blocks but the router's."""
    return name.startswith("model.layers.") and t.ndim == 2 and "norm" not in name and not name.endswith("gate.weight")


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(FP8 checkpoint dir, its dequantised fp32 reference dir) of one tiny random DeepSeek-V3."""
    root = tmp_path_factory.mktemp("fp8")
    save_tiny("deepseek_v3", root / "orig", **WIDE)
    with safe_open(str(root / "orig" / "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    stored, reference = {}, {}
    for name, t in tensors.items():
        if is_quantised(name, t):
            q, scale = quantize(t)
            stored |= {name: q, name + "_scale_inv": scale}
            reference[name] = dequantized(q, scale)
        else:
            stored[name] = reference[name] = t
    config = json.loads((root / "orig" / "config.json").read_text())
    for name, tensors_ in (("fp8", stored), ("reference", reference)):
        (root / name).mkdir()
        save_file(tensors_, str(root / name / "model.safetensors"))
        quant = {"quantization_config": QUANT} if name == "fp8" else {}
        (root / name / "config.json").write_text(json.dumps({**config, **quant}))
    moved = [(reference[n] - tensors[n]).abs().max() for n in reference if is_quantised(n, tensors[n])]
    assert len(moved) > 20 and min(moved) > 0  # quantisation changed every quantised weight
    return root / "fp8", root / "reference"


def test_fp8_imports_as_the_dequantised_weights(fp8_model, tmp_path: Path) -> None:
    """Every imported parameter equals the dequantised reference's import bit for bit; transformers running
    the reference gives our logits (1e-4, as every family's import)."""
    fp8_dir, ref_dir = fp8_model
    overrides = import_overrides(fp8_dir)
    assert overrides == [*import_overrides(ref_dir)[:-1], f"train.init_from={fp8_dir}"]  # same model shape
    ours = make_trainer(compose([*overrides, *RUN, f"run.dir={tmp_path / 'fp8'}"]))
    ref = make_trainer(compose([*import_overrides(ref_dir), *RUN, f"run.dir={tmp_path / 'ref'}"]))
    got, want = full_state_dict(ours.pm), full_state_dict(ref.pm)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name
    theirs = AutoModelForCausalLM.from_pretrained(ref_dir).eval()
    assert logits_diff(ours, theirs) <= 1e-4


def _reader(hf_dir: Path, reads: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> SafetensorsReader:
    real = train_hf.safe_open
    monkeypatch.setattr(train_hf, "safe_open", slice_only_safe_open(real, lambda n, t: reads.append((n, t.numel()))))
    return SafetensorsReader(hf_dir, BLOCK)


def test_a_box_across_block_boundaries_reads_only_its_slices(tmp_path: Path, monkeypatch) -> None:
    """Rows 100:230 and columns 50:190 of a 300 x 200 weight (2 x 2 of its 3 x 2 blocks, cut inside them):
    the dequantised box, reading the box's fp8 elements and those 4 scales, nothing else."""
    q, scale = quantize(torch.randn(300, 200, generator=torch.Generator().manual_seed(0)))
    save_file({"w": q, "w_scale_inv": scale}, str(tmp_path / "model.safetensors"))
    reads: list[tuple[str, int]] = []
    reader = _reader(tmp_path, reads, monkeypatch)
    box = (slice(100, 230), slice(50, 190))
    assert torch.equal(reader.read("w", box, (300, 200)), dequantized(q, scale)[box])
    assert sorted(reads) == [("w", 130 * 140), ("w_scale_inv", 4)]
    reader.close()


@pytest.mark.parametrize(
    ("name", "offset", "shape"),
    [
        ("layers.0.feed_forward.w1.weight", (80, 0), (80, 192)),  # tp rank 1 of 2: rows 80:160, block edge 128
        ("layers.1.attention.wo.weight", (96, 0), (96, 48)),  # an FSDP row half of [192, H*Vd], edge at 128
        ("layers.1.moe.experts.w2", (4, 0, 96), (4, 32, 96)),  # ep rank 1 of 2, columns cut at 96 (not 128)
    ],
)
def test_a_rank_slice_is_the_slice_of_the_dequantised_tensor(fp8_model, monkeypatch, name, offset, shape) -> None:
    """What a rank reads of our tensor through the family's map (experts transposed, one per HF tensor)
    equals the same box of the reference's tensor, and reads no more fp8 elements than the box holds."""
    fp8_dir, ref_dir = fp8_model
    hf = read_hf_config(fp8_dir, "import")
    cfg = compose(hydra_overrides(hf))
    tmap = TensorMap(FAMILIES["deepseek_v3"], cfg.model, hf)
    with torch.device("meta"):
        full = dict(Transformer(cfg.model, cfg.moe).named_parameters())[name].shape
    want = tmap.read(name, full, offset, torch.Size(shape), SafetensorsReader(ref_dir))
    reads: list[tuple[str, int]] = []
    got = tmap.read(name, full, offset, torch.Size(shape), _reader(fp8_dir, reads, monkeypatch))
    assert torch.equal(got, want)
    weights = sum(n for tensor, n in reads if not tensor.endswith("_scale_inv"))
    assert weights == torch.Size(shape).numel() and weights < full.numel()


KIMI_K2 = {  # moonshotai/Kimi-K2-Instruct's config.json (its auto_map and token ids left out)
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "aux_loss_alpha": 0.001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 131072,
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 384,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 64,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 64,
    "num_nextn_predict_layers": 0,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": QUANT,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 163840,
}


def test_kimi_k2_config_maps_as_deepseek_v3(tmp_path: Path) -> None:
    """Kimi-K2's config.json (model_type kimi_k2, FP8 blocks, YaRN with equal betas) gives a valid MLA model
    with its routing; on the meta device it has Kimi-K2's 1.026 T parameters (its model card's "1 T total",
    counted to 1.026 T by those who quantise it) and 32.9 B active (the card's "32 B activated", truncated)."""
    (tmp_path / "config.json").write_text(json.dumps(KIMI_K2))
    got = overrides_from_hf(read_hf_config(tmp_path, "import"))
    assert (got["model.attention"], got["moe.num_experts"], got["moe.n_groups"], got["moe.route_scale"]) == (
        "mla",
        384,
        1,
        2.827,
    )
    assert (got["model.yarn_factor"], got["model.yarn_beta_fast"], got["model.yarn_beta_slow"]) == (32.0, 1.0, 1.0)
    cfg = compose(hydra_overrides(read_hf_config(tmp_path, "import")))
    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe)
    total = sum(p.numel() for p in model.parameters())
    idle = len(model.moe_layers()) * (384 - 8) * 3 * 7168 * 2048
    assert round(total / 1e12, 3) == 1.026 and int((total - idle) / 1e9) == 32, (total, total - idle)


@pytest.mark.parametrize(
    ("quant", "field"),
    [
        ({"quant_method": "fp8"}, "quantization_config.weight_block_size=None"),
        ({**QUANT, "weight_block_size": [128]}, "quantization_config.weight_block_size=[128]"),
        ({"quant_method": "mxfp4"}, "quantization_config.quant_method=mxfp4"),
    ],
)
def test_other_quantisations_are_refused_naming_the_key(tmp_path: Path, quant: dict, field: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({**KIMI_K2, "quantization_config": quant}))
    with pytest.raises(ValueError, match="import=.*config.json has ") as err:
        read_hf_config(tmp_path, "import")
    assert field in str(err.value) and len(str(err.value).splitlines()) == 1


def test_fp8_weight_without_its_scale_is_refused(fp8_model, tmp_path: Path) -> None:
    fp8_dir, _ = fp8_model
    with safe_open(str(fp8_dir / "model.safetensors"), framework="pt") as f:
        kept = {n: f.get_tensor(n) for n in f.keys() if not n.endswith("o_proj.weight_scale_inv")}  # noqa: SIM118
    save_file(kept, str(tmp_path / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj.weight"
    with pytest.raises(ValueError, match=f"lacks tensor {name}_scale_inv"):
        SafetensorsReader(tmp_path, BLOCK).read(name, (slice(0, 8), slice(0, 8)), kept[name].shape)
