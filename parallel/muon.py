"""Muon (momentum orthogonalised by Newton-Schulz) for the hidden-layer matrices, AdamW for the rest, in one
optimizer that works on every layout.

Per Muon matrix W (A x B), gradient G, momentum mu, learning rate lr, weight decay wd (torch.optim.Muon's form):

    M <- mu M + (1 - mu) G                  the momentum buffer, an EMA
    U <- mu M + (1 - mu) G  (Nesterov)      or U <- M
    O <- NS_k(U)                            k quintic Newton-Schulz steps: U's singular values pushed near 1
    W <- (1 - lr wd) W - lr * rms_scale * sqrt(max(A, B)) * O

The update-RMS rule (Moonlight, "Muon is Scalable for LLM Training", arXiv 2502.16982; torch.optim.Muon's
adjust_lr_fn="match_rms_adamw"): an A x B matrix with unit singular values has RMS 1/sqrt(max(A, B)), so the
factor rms_scale * sqrt(max(A, B)) makes every Muon update's RMS about rms_scale (0.2: AdamW's typical update
RMS). AdamW's learning rate and weight decay then carry over unchanged. An expert tensor [E, X, Y] is E
matrices of X x Y, each orthogonalised on its own (one batched Newton-Schulz).

Muon takes 2-D hidden weights and expert weights; embeddings, the output head, norms, routers and biases take
AdamW (as Moonlight and Kimi K2 do): `takes_muon` decides by name. Muon keeps one fp32 buffer per element
(AdamW two, plus a step counter per tensor).

Newton-Schulz needs whole matrices, and the update of a shard is the shard of the whole matrix's update:
- a plain tensor (one process, a pipeline stage, experts under EP: each rank's [E/ep, X, Y] block holds its
  experts whole) is orthogonalised where it is, without communication;
- experts under FSDP split along the expert dim hold whole experts too: local;
- experts whose rows FSDP splits (fewer local experts than edp ranks) are moved by one all-to-all to whole
  experts, each on one rank of the edp group (ranks past the expert count hold none), orthogonalised there
  once, and moved back: no rank holds more than ceil(E_local / edp) experts, none repeats another's work;
- a tensor-parallel or FSDP-sharded 2-D weight is gathered over its own mesh (`full_tensor`: a TP or FSDP
  group), orthogonalised, and each rank keeps its slice. Every rank of that group repeats the same
  Newton-Schulz on that matrix; handing whole matrices round-robin to the group's ranks would divide that
  work (not done yet).
Momentum buffers are shaped and sharded like their parameters, so checkpoints save and reshard them as they
do AdamW's moments (parallel/checkpoint.py).
"""

from __future__ import annotations

import math
import re

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement

from moeyard.parallel.data_parallel import clean_fqn, is_expert_param

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic coefficients (torch.optim.Muon's): a steep slope at zero, so 5 steps bring small
singular values near 1 too, at the price of not converging exactly (about [0.6, 1.25], tests/unit/test_muon.py)."""
NS_EPS = 1e-7
"""Floor of the Frobenius norm the update is first divided by (an all-zero gradient stays zero)."""
_ADAMW_ONLY = re.compile(r"(^|\.)(tok_embeddings|output|router)\.")
_EXPERT_WEIGHT = re.compile(r"(^|\.)experts\.w[123]$")


def takes_muon(fqn: str, ndim: int) -> bool:
    """Whether parameter `fqn` of `ndim` dims is Muon's: expert weights and 2-D hidden weights; not embeddings,
    the output head, routers, norms or biases (expert biases are [E, F]: 2-D, but biases)."""
    fqn = clean_fqn(fqn)
    if is_expert_param(fqn):
        return bool(_EXPERT_WEIGHT.search(fqn))
    return ndim == 2 and not _ADAMW_ONLY.search(fqn)


def newton_schulz(u: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Approximately orthogonalises each matrix of `u` [..., A, B] (torch.optim.Muon's iteration, batched over
    leading dims); returns [..., A, B] in `dtype`.

    Hand-written because torch's `_zeropower_via_newtonschulz` is private, takes 2-D only and fixes bf16.
    """
    a, b, c = NS_COEFFICIENTS
    x = u.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)  # spectral norm <= Frobenius norm <= 1
    mm = torch.addmm if x.ndim == 2 else torch.baddbmm  # 2-D weights, or [E, X, Y] experts
    for _ in range(steps):
        gram = x @ x.mT
        x = mm(x, mm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _whole_matrices_local(p: torch.Tensor) -> bool:
    """Whether this rank's piece of `p` is a set of whole matrices: a plain tensor, or a DTensor split only along
    a leading (expert) dim."""
    if not isinstance(p, DTensor):
        return True
    return all(pl.is_replicate() or (pl.is_shard() and pl.dim < p.ndim - 2) for pl in p.placements)


def _by_whole_experts(p: DTensor) -> list[Placement] | None:
    """For an [E, X, Y] expert DTensor whose rows one mesh dim splits (FSDP with fewer local experts than edp
    ranks): its placements with that split moved to the expert dim, where each rank holds whole experts
    (unevenly: ranks past E hold none). None for any other tensor."""
    rows = [i for i, pl in enumerate(p.placements) if pl.is_shard() and pl.dim >= 1]
    if p.ndim != 3 or len(rows) != 1 or any(pl.is_shard() and pl.dim == 0 for pl in p.placements):
        return None
    return [Shard(0) if i == rows[0] else pl for i, pl in enumerate(p.placements)]


def orthogonalised_local(p: torch.Tensor, u_local: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """This rank's piece of NS(U), where `u_local` is this rank's piece of U, sharded like parameter `p`."""
    if _whole_matrices_local(p):
        return newton_schulz(u_local, steps, dtype)
    mesh, placements = p.device_mesh, p.placements
    u = DTensor.from_local(u_local, mesh, placements, shape=p.shape, stride=p.stride(), run_check=False)
    experts = _by_whole_experts(p)
    if experts is not None:  # one all-to-all each way; each expert orthogonalised once, on one rank
        mine = newton_schulz(u.redistribute(mesh, experts).to_local(), steps, dtype)
        done = DTensor.from_local(mine, mesh, experts, shape=p.shape, stride=p.stride(), run_check=False)
        return done.redistribute(mesh, placements).to_local()
    whole = newton_schulz(u.full_tensor(), steps, dtype)
    # Replicate -> the parameter's placements is a local slice: no communication.
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, placements).to_local()


class Muon(torch.optim.Optimizer):
    """Muon on its own param groups (module docstring), and `adamw` on the others, as one optimizer.

    Both share one `state` and one `param_groups` list, so the learning-rate schedule, zero_grad, checkpoints
    and memory tools see every parameter: Muon's hold "momentum_buffer", AdamW's their moments and step.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        adamw: torch.optim.AdamW,
        *,
        lr: float,
        weight_decay: float,
        momentum: float,
        nesterov: bool,
        ns_steps: int,
        rms_scale: float,
        ns_dtype: torch.dtype,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_steps": ns_steps,
            "rms_scale": rms_scale,
            "ns_dtype": ns_dtype,
            "muon": True,
        }
        super().__init__(params, defaults)
        self.adamw = adamw
        adamw.state = self.state
        self.param_groups.extend(adamw.param_groups)

    def init_state(self) -> None:
        """Zero momentum buffers (as the first step creates them), so a checkpoint load has tensors to fill."""
        for group in self.param_groups:
            if group.get("muon"):
                for p in group["params"]:
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        """One Muon step of the Muon groups, then AdamW's of the rest."""
        assert closure is None, "Muon takes no closure"
        self.init_state()
        for group in self.param_groups:
            if group.get("muon"):
                for p in group["params"]:
                    if p.grad is not None:
                        self._update(p, group)
        self.adamw.step()

    def _update(self, p: torch.nn.Parameter, group: dict) -> None:
        """The module docstring's update of one Muon parameter, on this rank's shard."""
        mu, lr = group["momentum"], group["lr"]
        assert not isinstance(p, DTensor) or p.grad.placements == p.placements, (p.placements, p.grad.placements)
        g, buf = _local(p.grad), _local(self.state[p]["momentum_buffer"])
        buf.lerp_(g, 1 - mu)
        u = g.lerp(buf, mu) if group["nesterov"] else buf
        o = orthogonalised_local(p, u, group["ns_steps"], group["ns_dtype"])
        scale = group["rms_scale"] * math.sqrt(max(p.shape[-2:]))
        w = _local(p)
        w.mul_(1 - lr * group["weight_decay"])
        w.add_(o.to(w.dtype), alpha=-lr * scale)
