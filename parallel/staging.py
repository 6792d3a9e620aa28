"""Host copies of this rank's shards for a background checkpoint save: allocated once, reused by every save.

A background save (`dcp.async_save`) first copies what it writes into host memory, so that training may go on
changing the shards while a thread writes the copies. `HostStager` makes that copy:
- one buffer per state-dict entry, kept from save to save (made again only when the entry's shape, dtype or
  device kind changes): a save allocates nothing once the first has run;
- pinned where the shard is on CUDA, so that each copy is a non-blocking DMA and one stream synchronisation
  ends them all; plain host memory elsewhere (torch pins only with an accelerator present, and a CPU shard's
  copy moves no data across a bus). The buffers are registered with CUDA in place (as DCP's own stager does)
  rather than taken from torch's pinned allocator, which rounds every block up to a power of two: up to
  twice the host memory, held for the whole run;
- exactly one copy per tensor: a DTensor's local shard is copied straight into its buffer, which is then
  wrapped with the DTensor's own sharding spec (no data moves again).

Hand-written because DCP's stagers miss this (seen with torch 2.11 and 2.13 on CPU): `DefaultStager` fails on a
state dict holding DTensors ("Attempted to call copy_() on an invalid python storage": it copies whole tensor
storages, which a DTensor has not), and torch 2.11's drops its buffers after every stage. The writer's own
staging (`BlockingAsyncStager`, what `async_save` uses by default) allocates new pageable memory at every
save and copies each DTensor's shard twice (`DTensor.to("cpu")`, then into a fresh local tensor). This class
plugs into DCP through its own `AsyncStager` protocol (`dcp.async_save(async_stager=...)`, in 2.11 and 2.13).
"""

from __future__ import annotations

import weakref
from concurrent.futures import Future
from typing import Any

import torch
import torch.cuda._pin_memory_utils as pin_memory_utils
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor


class HostStager(AsyncStager):
    """Stages a flat DCP state dict into host buffers reused across saves (see the module docstring)."""

    # `stage` returns only once every copy has landed: async_save need not call synchronize_staging.
    _synchronize_after_execute = False

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        """The host buffer of each state-dict entry, by its key (the tensor's FQN)."""
        self._made_for: dict[str, tuple[torch.Size, torch.dtype, str]] = {}
        self.writing: Future | None = None
        """The write that reads the buffers now: staging again before it has finished would change what it
        writes (and what its checksums cover)."""

    @torch.no_grad()
    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A copy of `state_dict` whose tensors live in this stager's host buffers (non-tensors as given)."""
        assert self.writing is None or self.writing.done(), "staging over buffers that a write still reads"
        staged = {key: self._stage_one(key, value) for key, value in state_dict.items()}
        cuda = {local.device for local in map(_local, state_dict.values()) if local is not None and local.is_cuda}
        for device in cuda:  # the copies were queued on the current stream: wait for them once
            torch.cuda.current_stream(device).synchronize()
        return staged

    def _stage_one(self, key: str, value: Any) -> Any:
        local = _local(value)
        if local is None:
            return value
        buffer = self._buffer(key, local)
        buffer.copy_(local, non_blocking=local.is_cuda)
        if isinstance(value, DTensor):  # the spec holds the global shape and placements, no device
            return DTensor(buffer, value._spec, requires_grad=False)
        return buffer

    def _buffer(self, key: str, local: torch.Tensor) -> torch.Tensor:
        wanted = (local.shape, local.dtype, local.device.type)
        if self._made_for.get(key) != wanted:
            self.buffers[key] = _host_buffer(local.shape, local.dtype, pin=local.is_cuda and local.numel() > 0)
            self._made_for[key] = wanted
        return self.buffers[key]

    def close(self) -> None:
        """Releases the buffers (pinned memory included)."""
        self.buffers.clear()
        self._made_for.clear()


def _host_buffer(shape: torch.Size, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor of exactly its size, page-locked for CUDA copies when `pin`."""
    buffer = torch.empty(shape, dtype=dtype)
    if pin:
        pointer = buffer.data_ptr()
        pin_memory_utils.pin_memory(pointer, buffer.untyped_storage().nbytes())
        unpin = weakref.finalize(buffer, pin_memory_utils.unpin_memory, pointer)
        unpin.atexit = False  # at exit the CUDA context may be gone already; the process's memory goes with it
    return buffer


def _local(value: Any) -> torch.Tensor | None:
    """The tensor whose data a state-dict entry holds on this rank (a DTensor's local shard), else None."""
    if isinstance(value, DTensor):
        return value._local_tensor
    return value if isinstance(value, torch.Tensor) else None
