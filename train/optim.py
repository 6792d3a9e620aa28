"""The optimizer (AdamW, or Muon for hidden matrices with AdamW for the rest) and the learning-rate schedule
(linear warmup, then cosine decay)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

from moeyard.moe.config import check_fields, choice, require
from moeyard.parallel.muon import Muon, takes_muon


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW (or Muon) with linear warmup then cosine decay."""

    name: str = choice("adamw", "muon")
    """adamw: AdamW for every parameter. muon: Muon (parallel/muon.py) for 2-D hidden weights and each expert
    matrix, AdamW for embeddings, output head, norms, routers and biases; both at `lr` and `weight_decay`."""
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
    muon_momentum: float = 0.95
    """Muon's momentum (an EMA of the gradients, as torch.optim.Muon's)."""
    muon_nesterov: bool = True
    """Muon orthogonalises the Nesterov look-ahead of the momentum rather than the momentum itself."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations per Muon update."""
    muon_rms_scale: float = 0.2
    """Update-RMS rule (Moonlight): an A x B matrix's orthogonalised update is scaled by
    muon_rms_scale * sqrt(max(A, B)), so its RMS is about muon_rms_scale, AdamW's, and lr carries over."""
    muon_ns_dtype: str = choice("auto", "float32", "bfloat16")
    """Newton-Schulz precision (auto: bf16 on CUDA, as Keller Jordan's Muon; fp32 elsewhere, where bf16 is no
    faster)."""

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
        require(0 <= self.muon_momentum < 1, "optim.muon_momentum", self.muon_momentum, "must be in [0, 1)")
        require(1 <= self.muon_ns_steps < 100, "optim.muon_ns_steps", self.muon_ns_steps, "must be in [1, 99]")
        require(self.muon_rms_scale > 0, "optim.muon_rms_scale", self.muon_rms_scale, "must be > 0")


def lr_at(step: int, o: OptimConfig, total_steps: int) -> float:
    """Linear warmup to o.lr, then cosine decay to o.lr * min_lr_ratio at `total_steps`."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def build_optimizer(
    named_params: list[tuple[str, torch.nn.Parameter]], o: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """optim.name: AdamW for every parameter, or Muon for those `takes_muon` picks and AdamW for the rest."""
    muon = [p for name, p in named_params if takes_muon(name, p.ndim)] if o.name == "muon" else []
    if not muon:  # AdamW alone (also a pipeline stage without hidden matrices)
        return build_adamw(named_params, o, device)
    rest = [(name, p) for name, p in named_params if not takes_muon(name, p.ndim)]
    ns_dtype = torch.bfloat16 if o.muon_ns_dtype == "bfloat16" else torch.float32
    if o.muon_ns_dtype == "auto" and device.type == "cuda":
        ns_dtype = torch.bfloat16
    return Muon(
        muon,
        build_adamw(rest, o, device),
        lr=o.lr,
        weight_decay=o.weight_decay,
        momentum=o.muon_momentum,
        nesterov=o.muon_nesterov,
        ns_steps=o.muon_ns_steps,
        rms_scale=o.muon_rms_scale,
        ns_dtype=ns_dtype,
    )


def build_adamw(
    named_params: list[tuple[str, torch.nn.Parameter]], o: OptimConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms) do not; fused kernel on CUDA (apex's FusedAdam equivalent).

    DTensor and plain parameters go to separate groups: the multi-tensor kernels cannot mix them.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for _, p in named_params:
        groups.setdefault((p.ndim >= 2, isinstance(p, DTensor)), []).append(p)
    param_groups = [
        {"params": params, "weight_decay": o.weight_decay if decay else 0.0}
        for (decay, _), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(param_groups, **adamw_options(o, device))


def adamw_options(o: OptimConfig, device: torch.device) -> dict:
    """AdamW's options besides its groups (also parallel/zero.py's, which steps master slices)."""
    fused = o.fused == "on" or (o.fused == "auto" and device.type == "cuda")
    return {
        "lr": o.lr,
        "betas": (o.beta1, o.beta2),
        "eps": o.eps,
        "fused": fused or None,
        "foreach": None if fused else True,
    }
