"""MXFP4 expert weights, as OpenAI publishes gpt-oss, dequantised on import.

Such a checkpoint's config.json says `quantization_config: {quant_method: mxfp4, ...}`; the routed experts'
weights are stored as two tensors each, and everything else (attention, router, embeddings, biases) as it is:
- `<name>_blocks` uint8 [E, out, in/32, 16]: each byte packs two e2m1 (FP4) values, the low nibble the even
  element, the high nibble the odd one, so a row of 16 bytes holds one 32-element group along `in`;
- `<name>_scales` uint8 [E, out, in/32]: the group's shared e8m0 exponent, biased by 127.
An element is e2m1(nibble) * 2^(scale - 127) (the OCP Microscaling format). The weight in transformers'
memory layout, the one the family's names describe, is the transpose [E, in, out] (gate_up_proj [E, D, 2F],
down_proj [E, F, D]).

As with FP8 (`fp8.py`) we dequantise in fp32 and read only the groups a rank's box overlaps.
"""

from __future__ import annotations

import torch

BLOCKS, SCALES = "_blocks", "_scales"
"""Weight `name` is stored as `name + BLOCKS` and `name + SCALES`."""
GROUP = 32
"""Elements per shared exponent (16 bytes of two nibbles)."""
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The value of each 4-bit code: sign bit, two exponent bits, one mantissa bit."""


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 [..., groups * 32] of uint8 blocks [..., groups, 16] and uint8 exponents [..., groups]."""
    lut = torch.tensor(E2M1)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # low nibble first: the even element
    values = lut[codes].flatten(-2)  # [..., groups, 32]
    return torch.ldexp(values, scales.long()[..., None] - 127).flatten(-2)


def read_box(part_blocks, part_scales, box: tuple[slice, ...]) -> torch.Tensor:
    """The fp32 `box` of a 3-D weight in transformers' layout [E, in, out], from the safetensors slices of its
    blocks [E, out, in/32, 16] and scales [E, out, in/32]: only the groups along `in` that the box overlaps."""
    experts, ins, outs = box
    first, last = ins.start // GROUP, -(-ins.stop // GROUP)
    groups = slice(first, last)
    values = dequantize(part_blocks[experts, outs, groups], part_scales[experts, outs, groups])
    start = ins.start - first * GROUP
    return values[..., start : start + ins.stop - ins.start].transpose(1, 2)
