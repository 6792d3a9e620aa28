"""AdamW and the learning-rate schedule (linear warmup, then cosine decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from moeyard.moe.config import check_fields, choice, require


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = 10
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay (not applied to norms, biases or router bias)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    fused: str = choice("auto", "on", "off")
    """Fused AdamW kernel (auto: on CUDA only; the foreach kernel elsewhere)."""

    def check(self) -> None:
        """Raises ValueError naming the first field whose value breaks a rule."""
        check_fields(self, "optim.")
        require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"optim.{name}", getattr(self, name), "must be in [0, 1)")
        require(self.eps > 0, "optim.eps", self.eps, "must be > 0")
        require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")


def lr_at(step: int, o: OptimConfig, total_steps: int) -> float:
    """Linear warmup to o.lr, then cosine decay to o.lr * min_lr_ratio at `total_steps`."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def build_optimizer(
    named_params: list[tuple[str, torch.nn.Parameter]], o: OptimConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms) do not; fused kernel on CUDA (apex's FusedAdam equivalent).

    DTensor and plain parameters go to separate groups: the multi-tensor kernels cannot mix them.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for _, p in named_params:
        groups.setdefault((p.ndim >= 2, isinstance(p, DTensor)), []).append(p)
    fused = o.fused == "on" or (o.fused == "auto" and device.type == "cuda")
    param_groups = [
        {"params": params, "weight_decay": o.weight_decay if decay else 0.0}
        for (decay, _), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(
        param_groups,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )
