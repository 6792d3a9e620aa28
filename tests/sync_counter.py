"""Counts the calls that would make a CUDA device synchronise with the host, on CPU.

On CPU nothing waits, so the count is taken from the calls themselves: the tensor methods that read data
back to the host (`.item()`/`bool()`/`float()` go through `aten._local_scalar_dense`; `.tolist()`, `.cpu()`,
`.numpy()` do not dispatch, so they are seen as torch functions), and the ops whose output size depends on
the data, which CUDA must read back to size (boolean-mask indexing, `nonzero`, `masked_select`, `bincount`, `unique`,
`repeat_interleave` without `output_size`), and host-to-device copies that make the host wait: from
pageable memory (CUDA waits for the stream before staging those), or without `non_blocking`, including
`torch.tensor(value, device=...)`. Which tensors are on the host is told, on CPU, as `tests/device_check.py`
tells it (by how they were made), and any explicit target device counts as the step's device. Pinning needs
an accelerator: without one, `pin_memory()` is stood in for by a host copy marked pinned, so a test can run
the CUDA path's copies (with `train.data.pins_memory` answering True) and see them counted or not.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from tests.device_check import DeviceMixCheck

aten = torch.ops.aten
DATA_DEPENDENT = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
}
HOST_METHODS = ("tolist", "cpu", "numpy")
MADE_FROM_HOST_DATA = {"tensor", "as_tensor"}
"""Factories that, given `device=`, build the tensor on the host and copy it over (blocking on CUDA)."""


class HostToDevice(DeviceMixCheck):
    """Calls `note(what)` for every host-to-device copy that is not a non_blocking copy from pinned memory."""

    def __init__(self, note) -> None:
        super().__init__()
        self.note = note
        self.pinned = WeakIdKeyDictionary()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in HOST_METHODS and args and isinstance(args[0], torch.Tensor) and not self.is_host(args[0]):
            self.note(f"Tensor.{name}")
        if name == "pin_memory" and not torch.accelerator.is_available():
            out = args[0].clone()  # the stand-in: a host copy, marked pinned
            self.host[out] = self.pinned[out] = True
            return out
        if name == "is_pinned" and not torch.accelerator.is_available():
            return args[0] in self.pinned
        source = self._host_source(name, args, kwargs)
        if source is not None:
            non_blocking = kwargs.get("non_blocking", False) or (name == "copy_" and len(args) > 2 and args[2])
            if not (isinstance(source, torch.Tensor) and source in self.pinned):
                self.note(f"host-to-device {name} from pageable memory")
            elif not non_blocking:
                self.note(f"blocking host-to-device {name}")
        return super().__torch_function__(func, types, args, kwargs)

    def _host_source(self, name: str, args: tuple, kwargs: dict):
        """What a host-to-device copy reads (a host tensor, or Python data), or None if the call is none."""
        if name in MADE_FROM_HOST_DATA and kwargs.get("device") is not None and args:
            data = args[0]
            return data if not isinstance(data, torch.Tensor) or self.is_host(data) else None
        if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor) and self.is_host(args[0]):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if name == "cuda" or isinstance(target, (torch.device, str, int)):
                return args[0]
            if isinstance(target, torch.Tensor) and not self.is_host(target):
                return args[0]
        if name in ("copy_", "__setitem__") and len(args) > 1 and isinstance(args[0], torch.Tensor):
            source = args[1] if name == "copy_" else args[2]
            if not self.is_host(args[0]) and isinstance(source, torch.Tensor) and self.is_host(source):
                return source
        return None


class SyncCounter(TorchDispatchMode):
    """Within `with SyncCounter() as c:`, `c.calls` lists (what, where) for every synchronising call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.copies = HostToDevice(self._note)

    def _note(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "sync_counter" not in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 2)[-2:]}:{frames[-1].lineno}" if frames else "?"
        self.calls.append((what, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if tensors and all(self.copies.is_host(t) for t in tensors):
            return func(*args, **kwargs)  # host work (e.g. on values already read back): no device waits
        if func in DATA_DEPENDENT:
            self._note(str(func))
        elif func is aten.index.Tensor and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self._note("boolean-mask index")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._note("repeat_interleave without output_size")
        return func(*args, **kwargs)

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self.copies)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()
