"""Counts the calls that would make a CUDA device synchronise with the host, on CPU.

On CPU nothing waits, so the count is taken from the calls themselves: the tensor methods that read data
back to the host (`.item()`/`bool()`/`float()` go through `aten._local_scalar_dense`; `.tolist()`, `.cpu()`,
`.numpy()` do not dispatch, so they are wrapped), and the ops whose output size depends on the data, which
CUDA must read back to size (boolean-mask indexing, `nonzero`, `masked_select`, `bincount`, `unique`,
`repeat_interleave` without `output_size`).
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class SyncCounter(TorchDispatchMode):
    """Within `with SyncCounter() as c:`, `c.calls` lists (what, where) for every synchronising call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def _note(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "sync_counter" not in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 2)[-2:]}:{frames[-1].lineno}" if frames else "?"
        self.calls.append((what, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DATA_DEPENDENT:
            self._note(str(func))
        elif func is aten.index.Tensor and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            self._note("boolean-mask index")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._note("repeat_interleave without output_size")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def _host_methods(self) -> Iterator[None]:
        originals = {name: getattr(torch.Tensor, name) for name in HOST_METHODS}

        def wrap(name):
            def method(t, *a, **k):
                self._note(f"Tensor.{name}")
                return originals[name](t, *a, **k)

            return method

        for name in HOST_METHODS:
            setattr(torch.Tensor, name, wrap(name))
        try:
            yield
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(self._host_methods())
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._stack.close()
