"""Block-quantised FP8 weights, as DeepSeek-V3 and Kimi-K2 publish them, dequantised on import.

Such a checkpoint's config.json says `quantization_config: {quant_method: fp8, weight_block_size: [128, 128],
...}`. Each quantised Linear weight W [rows, cols] is stored as float8 (e4m3) beside `<name>_scale_inv`, fp32
[ceil(rows/128), ceil(cols/128)]: one scale per 128 x 128 block (the edge blocks ragged), and the weight is
W[i, j] = fp8[i, j] * scale_inv[i // 128, j // 128] (the name says "inverse" of the quantiser's scale:
quantising divided by it). Norms, embeddings, the head and the router stay unquantised.

We dequantise in fp32 (one rounding of the product) and let the model's parameter dtype round again, rather
than DeepSeek's fp8_cast_bf16 script, which writes a second, bf16 copy of the whole checkpoint first. A rank
asks for a box of a weight: it reads that box of the fp8 tensor and only the scale blocks the box overlaps,
never the whole tensor.
"""

from __future__ import annotations

import torch

SCALE_SUFFIX = "_scale_inv"
"""The scale of weight `name` is tensor `name + SCALE_SUFFIX`."""


def block_shape(hf: dict) -> tuple[int, int] | None:
    """The FP8 block shape config.json's quantization_config names (None: not FP8). ValueError, naming the
    key, for a method other than fp8 or gpt-oss's mxfp4 (`mxfp4.py`), or a missing or malformed block shape."""
    quant = hf.get("quantization_config") or {}
    method = quant.get("quant_method")
    mxfp4 = method == "mxfp4" and hf.get("model_type") == "gpt_oss"  # its experts, read by interop/mxfp4.py
    if method is None or mxfp4:
        return None
    if method != "fp8":
        raise ValueError(
            f"config.json has quantization_config.quant_method={method} (rule: must be absent, fp8 with "
            "weight_block_size, or mxfp4 for gpt-oss; dequantize other formats to bf16 first)"
        )
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b >= 1 for b in block)):
        raise ValueError(
            f"config.json has quantization_config.weight_block_size={block} (rule: fp8 weights need their "
            "block shape, two positive ints such as [128, 128])"
        )
    return block[0], block[1]


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The shape of the scale of a weight of `shape`: one per block, ragged edge blocks included."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def dequantize(
    weight_box: torch.Tensor, scale_blocks: torch.Tensor, box: tuple[slice, slice], block: tuple[int, int]
) -> torch.Tensor:
    """fp32 weight of the `box` (row and column slices) of a block-quantised weight, [box rows, box cols].

    Args:
        weight_box: the box of the float8 weight, [box rows, box cols].
        scale_blocks: the scales of the blocks the box overlaps (`scale_box`), fp32.
        box: the box, as slices of the full weight with start and stop set.
        block: the block shape (rows, cols).
    """
    (rows, cols), (br, bc) = box, block
    per_element = scale_blocks.float().repeat_interleave(br, 0).repeat_interleave(bc, 1)
    r0, c0 = rows.start % br, cols.start % bc  # where the box starts within its first block
    per_element = per_element[r0 : r0 + weight_box.shape[0], c0 : c0 + weight_box.shape[1]]
    return weight_box.float() * per_element


def scale_box(box: tuple[slice, slice], block: tuple[int, int]) -> tuple[slice, slice]:
    """The slices of the scale tensor holding the blocks that `box` overlaps."""
    return tuple(slice(s.start // b, -(-s.stop // b)) for s, b in zip(box, block, strict=True))
