"""Working memory kept between calls for the CPU layer's large temporaries.

torch's CPU allocator takes large blocks (32 MiB and up: glibc's mmap threshold) from the OS on every
allocation and hands them back when freed, so a fresh [N, D] temporary page-faults its way in each step: at
the fine-grained shape of benchmarks/moe_layer.py an index_select into a new 32 MiB tensor took 12 ms at 2
threads against 1.4 ms into a kept one. CUDA's caching allocator keeps freed blocks; torch has no such
allocator for CPU tensors that Python can switch on, and changing glibc's thresholds (mallopt) would change
every allocation of the process. So the hand-written CPU functions of moe/experts.py take the temporaries
that die before they return from here: one flat buffer per thread and dtype, grown to the largest call and
kept. It holds what the largest such call holds at its peak anyway, only for the whole run instead of that
call; the planner counts it under every peak (plan/activations.py `scratch_bytes`).
"""

from __future__ import annotations

import math
import threading

import torch

ALIGN_BYTES = 64
"""Each tensor starts on a cache line (grouped_mm needs 16-byte aligned operands)."""

_arenas = threading.local()


def take(dtype: torch.dtype, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Uninitialised CPU tensors of `shapes`, carved from this thread's buffer for `dtype`.

    Valid until the next `take` on this thread: a caller uses them only inside one call and returns none of
    them (nor a view of one), and takes them after reading its saved tensors (an activation-checkpoint
    recompute runs while they are read, and takes its own)."""
    step = max(1, ALIGN_BYTES // dtype.itemsize)
    sizes = [math.prod(shape) for shape in shapes]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + -(-size // step) * step)
    flat = _buffer(dtype, starts[-1])
    return [
        flat[start : start + size].view(shape) for start, size, shape in zip(starts[:-1], sizes, shapes, strict=True)
    ]


def _buffer(dtype: torch.dtype, numel: int) -> torch.Tensor:
    buffers = _arenas.__dict__.setdefault("by_dtype", {})
    flat = buffers.get(dtype)
    if flat is None or flat.numel() < numel:
        flat = torch.empty(numel, dtype=dtype)
        buffers[dtype] = flat
    return flat


def release() -> None:
    """Drops this thread's buffers: the next `take` allocates anew (a fresh run's first step)."""
    _arenas.__dict__.pop("by_dtype", None)


def held_bytes() -> int:
    """Bytes this thread's buffers hold."""
    return sum(t.numel() * t.element_size() for t in getattr(_arenas, "by_dtype", {}).values())
