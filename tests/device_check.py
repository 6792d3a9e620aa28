"""Catches, on CPU, the tensor placements that would fail or synchronise on a GPU.

On a CPU run every tensor is on the CPU, so a tensor the trainer meant for the host and one it meant for the
device look alike. This mode tells them apart by how they were made: a factory call without a `device`
argument (`torch.zeros(n)`, `torch.tensor(...)`, `torch.from_numpy`), `.cpu()`, and any op whose inputs are
all such host tensors give a *host* tensor; everything else (explicit `device=`, `.to(device)`, model
parameters, autograd's gradients) counts as on the device. It then applies CUDA's rules: host and device
tensors may meet in one op only where the host one is a 0-dim scalar, never in cat/stack, and never with
a host tensor as the output of an in-place op. Cross-device copies (`.to`, `copy_`, `__setitem__`) are
allowed, as on CUDA. (FakeTensorMode's fake `cuda` tensors would be stricter, but a CPU-only build cannot
index them or record autograd on them: both ask for a CUDA device guard.)
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

FACTORIES = {
    "zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "from_numpy", "scalar_tensor",
    "rand", "randn", "randint", "linspace", "eye", "zeros_like", "ones_like", "empty_like", "full_like",
}  # fmt: skip
"""Functions that make a tensor; without `device=` a plain factory makes a host one (`*_like` follow their
input)."""
COPIES = {"to", "copy_", "__setitem__", "cpu", "cuda", "clone", "detach", "tolist", "item", "numpy"}
"""Cross-device moves and reads: allowed to see both kinds."""
JOINS = {"cat", "stack", "concat", "concatenate", "hstack", "vstack"}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


class DeviceMixCheck(TorchFunctionMode):
    """Within `with DeviceMixCheck() as check:`, `check.violations` lists what CUDA would reject."""

    def __init__(self) -> None:
        super().__init__()
        self.host = WeakIdKeyDictionary()
        self.violations: list[str] = []

    def is_host(self, t: torch.Tensor) -> bool:
        return t in self.host

    def __enter__(self):
        # torch.from_numpy takes no tensor and is not overridable, so no mode sees it: wrapped while inside.
        self._from_numpy = torch.from_numpy

        def from_numpy(array):
            out = self._from_numpy(array)
            self.host[out] = True
            return out

        torch.from_numpy = from_numpy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.from_numpy = self._from_numpy
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if self.is_host(t)]
        device = [t for t in tensors if not self.is_host(t)]
        if host and device and name not in COPIES:
            self._check(name, host, device, args, kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self._tag(name, out, tensors, host, kwargs)
        return out

    def _check(self, name: str, host: list, device: list, args: tuple, kwargs: dict) -> None:
        inplace = name.endswith("_") and not name.startswith("_") or name.startswith("__i") or "out" in kwargs
        target = kwargs.get("out", args[0] if args else None)
        if inplace and isinstance(target, torch.Tensor) and self.is_host(target):
            self.violations.append(f"{name}: a host tensor {tuple(target.shape)} written from the device")
        elif name in JOINS:
            self.violations.append(f"{name}: host and device tensors joined")
        elif any(t.ndim > 0 for t in host):
            shapes = [tuple(t.shape) for t in host if t.ndim > 0]
            self.violations.append(f"{name}: host tensors {shapes} used with device tensors")

    def _tag(self, name: str, out: torch.Tensor, tensors: list, host: list, kwargs: dict) -> None:
        if name == "cpu" or (name in FACTORIES and not name.endswith("_like") and kwargs.get("device") is None):
            self.host[out] = True
        elif name == "to" or kwargs.get("device") is not None:
            self.host.pop(out, None)  # .to(device) may return its input: it is the device's now
        elif tensors and len(host) == len(tensors):
            self.host[out] = True
