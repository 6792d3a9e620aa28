"""Initial weights that any shard computes from its global indices alone.

Every element of a parameter is a pure function of (seed, parameter name, the element's flat index in the
full tensor): a counter-based generator (splitmix64 of the counter) gives 64 random bits, Box-Muller turns
two 24-bit parts of them into one standard normal, and the parameter's std scales it. A rank
therefore fills exactly its local shard (its experts, its tensor-parallel slice, its FSDP rows) without ever
creating the full tensor, and every layout starts from the same weights as one process.

Values are generated in blocks of at most BLOCK elements on a CPU (DEVICE_BLOCK on a GPU), so temporaries
stay small (never larger than the shard being filled, rounded up to 64 elements). On a CPU an element costs
about twice what torch.randn's does (some 15 ns against 7 on one core: int64 multiplies and int-to-float
conversions are not vectorised), and blocks run on several threads; on a GPU the same ops run on the device.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from moeyard.moe.config import ModelConfig

_LANES = 64
"""Blocks are padded to a multiple of this, so that torch's CPU kernels run every element through their
vectorised path (their scalar tail loop computes log and cos with different rounding): the same element gets
the same bits whichever block, shard or layout it is generated in."""
BLOCK = (1 << 15) - _LANES
"""Most elements generated at once on a CPU: small temporaries, and under torch's parallel grain (32768), so
no op is split over threads at a point that is not a multiple of _LANES."""
DEVICE_BLOCK = 1 << 22
"""Most elements generated at once on a GPU: 4 Mi elements, about 100 MB of temporaries."""
_M64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch lacks uint64 shifts and adds)."""
    return c - (1 << 64) if c >= 1 << 63 else c


def _mix_int(z: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2^64)."""
    z = ((z ^ (z >> 30)) * _MIX1) & _M64
    z = ((z ^ (z >> 27)) * _MIX2) & _M64
    return z ^ (z >> 31)


def stream_key(seed: int, fqn: str) -> int:
    """The 64-bit key of parameter `fqn`'s stream under `seed`."""
    return _mix_int((seed * 1_000_003 + zlib.crc32(fqn.encode())) & _M64)


def normal_at(index: torch.Tensor, key: int, std: float = 1.0) -> torch.Tensor:
    """Normals (float32, mean 0, `std`) at flat indices `index` (int64, 1-D, consumed in place) of stream `key`.

    Counter i hashes to z = splitmix64(key + (i + 1) * gamma), the i-th output of the splitmix64 sequence
    seeded by key (Steele et al., 2014); z's top and bottom 24 bits are the two uniforms of Box-Muller, exact
    in float32.
    """
    z = index.mul_(_signed(_GAMMA)).add_(_signed((key + _GAMMA) & _M64))  # int64 arithmetic wraps like uint64
    shifted = torch.empty_like(z)
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        # `>>` on int64 is arithmetic: mask off the copies of the sign bit to shift logically.
        torch.bitwise_right_shift(z, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(shifted)
        if mult is not None:
            z.mul_(_signed(mult))
    # Arithmetic `>> 40` leaves the top 24 bits as a signed value in [-2^23, 2^23): shifted, it is in (0, 2^24].
    u1 = torch.bitwise_right_shift(z, 40, out=shifted).float().add_(2.0**23 + 1.0).mul_(2.0**-24)  # (0, 1]
    angle = z.bitwise_and_(0xFFFFFF).float().mul_(2 * math.pi * 2.0**-24)  # [0, 2 pi)
    return u1.log_().mul_(-2.0 * std * std).sqrt_().mul_(angle.cos_())


def _leaves(out: torch.Tensor, base: int, strides: Sequence[int], block: int) -> Iterator[tuple]:
    """`out` cut into blocks of at most `block` elements: (view, its base flat index, strides), in order."""
    if out.numel() <= block:
        yield out, base, strides
        return
    inner = math.prod(out.shape[1:])
    if inner > block:  # one leading index at a time, each split further
        for i in range(out.shape[0]):
            yield from _leaves(out[i], base + i * strides[0], strides[1:], block)
        return
    rows = block // inner
    for i in range(0, out.shape[0], rows):
        yield from _leaves(out[i : i + rows], base + i * strides[0], strides, block)


@torch.no_grad()  # here too: grad mode is per thread, and blocks of a parameter may fill on worker threads
def _fill_block_(out: torch.Tensor, key: int, std: float, base: int, strides: Sequence[int]) -> None:
    """Fills one block, whose element [i0, i1, ...] is full-tensor flat index base + sum(i_d * strides[d])."""
    n = out.numel()
    padded = -(-n // _LANES) * _LANES
    if all(size == 1 or strides[d] == math.prod(out.shape[d + 1 :]) for d, size in enumerate(out.shape)):
        # The block is one run of the full tensor's flat indices (the padding just runs on).
        index = torch.arange(base, base + padded, device=out.device)
    else:
        index = torch.zeros(padded, dtype=torch.int64, device=out.device)
        view = index[:n].view(out.shape)
        view.fill_(base)
        for d, (size, stride) in enumerate(zip(out.shape, strides, strict=True)):
            shape = [1] * out.ndim
            shape[d] = size
            view.add_(torch.arange(0, size * stride, stride, device=out.device).view(shape))
    out.copy_(normal_at(index, key, std)[:n].view(out.shape))


def _fill_normal_(out: torch.Tensor, key: int, std: float, base: int, strides: Sequence[int]) -> None:
    """Fills `out`, whose element [i0, i1, ...] is full-tensor flat index base + sum(i_d * strides[d]).

    On a CPU the blocks stay under torch's parallel grain (each op runs on one thread, so no element
    changes path with the thread count) and run side by side on torch's thread count of Python threads
    (ops release the interpreter lock), which gives back the parallelism. On a GPU an element's bits do not
    depend on its block, and every op is a kernel launch: blocks of DEVICE_BLOCK keep a multi-billion
    parameter shard's start-up in seconds rather than minutes of launches.
    """
    on_cpu = out.device.type == "cpu"
    leaves = list(_leaves(out, base, strides, BLOCK if on_cpu else DEVICE_BLOCK))
    threads = torch.get_num_threads() if on_cpu else 1
    if threads == 1 or len(leaves) == 1:
        for view, start, view_strides in leaves:
            _fill_block_(view, key, std, start, view_strides)
        return
    with ThreadPoolExecutor(min(threads, len(leaves))) as pool:
        list(pool.map(lambda leaf: _fill_block_(leaf[0], key, std, leaf[1], leaf[2]), leaves))


def init_rule(fqn: str, ndim: int, cfg: ModelConfig) -> float | str:
    """How parameter `fqn` starts: "ones" (norm weights: block, final, q/k and MLA latent norms), "zeros"
    (expert biases and linear biases, e.g. the q/k/v biases), or a normal's std.

    Residual-branch outputs (attention wo, dense and expert w2) get the GPT-2 scaling std / sqrt(2 * n_layers).
    """
    if "norm" in fqn and ndim == 1:
        return "ones"
    if fqn.rsplit(".", 1)[-1] in ("expert_bias", "bias", "b1", "b2", "b3"):  # b*: routed experts' biases
        return "zeros"
    if any(f".{name}." in f".{fqn}." for name in ("wo", "w2")):
        return cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return cfg.init_std


@torch.no_grad()
def init_slice_(
    out: torch.Tensor, fqn: str, full_shape: Sequence[int], offset: Sequence[int], cfg: ModelConfig, seed: int
) -> torch.Tensor:
    """Fills `out` with the block of parameter `fqn`'s initial value that starts at `offset` of the full tensor.

    Args:
        out: the block to fill (any float dtype and device); its shape is the block's extent per dim.
        fqn: the parameter's layout-free name (it keys the random stream).
        full_shape: shape of the full (unsharded) parameter.
        offset: index of out[0, 0, ...] in the full tensor, one entry per dim.
    """
    assert len(full_shape) == len(offset) == out.ndim, (fqn, full_shape, offset, out.shape)
    assert all(o + n <= f for o, n, f in zip(offset, out.shape, full_shape, strict=True)), (fqn, offset, out.shape)
    rule = init_rule(fqn, out.ndim, cfg)
    if rule == "ones":
        return out.fill_(1.0)
    if rule == "zeros" or out.numel() == 0:
        return out.zero_()
    strides = [math.prod(full_shape[d + 1 :]) for d in range(len(full_shape))]
    base = sum(o * s for o, s in zip(offset, strides, strict=True))
    _fill_normal_(out, stream_key(seed, fqn), rule, base, strides)
    return out


def init_full_tensor(fqn: str, shape: Sequence[int], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The initial value of parameter `fqn` at its full (unsharded) shape, fp32 on the CPU."""
    return init_slice_(torch.empty(tuple(shape)), fqn, shape, [0] * len(shape), cfg, seed)
