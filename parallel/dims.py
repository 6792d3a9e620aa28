"""ParallelDims: the one place that validates parallel degrees and builds the named DeviceMeshes.

Two meshes over the same ranks, both row-major (Megatron-Core's "parallel folding"):
- dense layers: pp, dp, tp (outermost first); "batch" flattens (dp, tp), the ranks that share one
  micro-batch's tokens. tp is innermost so tensor-parallel ranks share a node. With context parallelism
  (cp > 1) the dp axis holds dp x cp ranks, cp innermost: context-parallel ranks hold the same parameters
  and reduce gradients as data-parallel ranks do (each holds as many tokens), so gradients, FSDP and the
  balancing counts need nothing new; a third mesh (pp, dp, cp, tp) names only the cp groups, over which
  attention gathers keys and values (parallel/context.py).
- experts: pp, edp, ep with edp * ep = dp * cp * tp. ep takes consecutive ranks, so an expert-parallel group
  spans the tp ranks first (their MoE work is split, not repeated) and then neighbouring dp ranks, keeping
  the all-to-all as local as the layout allows; edp ranks hold replicas of the same experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moeyard.parallel.config import ParallelConfig


class Axis(StrEnum):
    """Mesh axis names."""

    PP = "pp"
    DP = "dp"
    TP = "tp"
    BATCH = "batch"
    EDP = "edp"
    EP = "ep"
    CP = "cp"


def _rule(field: str, value: object, rule: str) -> ValueError:
    return ValueError(f"{field}={value} {rule}")


@dataclass(frozen=True)
class ParallelDims:
    """Validated degrees; `world_size = pp * dp * cp * tp` and `dp * cp * tp = edp * ep`."""

    pp: int
    dp: int
    tp: int
    ep: int
    world_size: int
    cp: int = 1

    @property
    def dp_cp(self) -> int:
        """Ranks holding the same dense parameters and averaging their gradients: the dense mesh's dp axis."""
        return self.dp * self.cp

    @property
    def edp(self) -> int:
        """Replicas of each expert: the dp x cp x tp ranks sharing a micro-batch, over ep."""
        return self.dp_cp * self.tp // self.ep

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_config(cls, p: ParallelConfig, world_size: int) -> ParallelDims:
        """Checks degrees against the world size and infers dp=-1; raises ValueError naming the field."""
        for name in ("tp", "pp", "ep", "cp"):
            if getattr(p, name) < 1:
                raise _rule(f"parallel.{name}", getattr(p, name), "must be >= 1")
        if p.dp == 0 or p.dp < -1:
            raise _rule("parallel.dp", p.dp, "must be >= 1, or -1 to infer it from the world size")
        named = ["pp", "cp", "tp"] if p.cp > 1 else ["pp", "tp"]  # cp is named only where it is used
        fixed = math.prod(getattr(p, n) for n in named)
        if world_size % fixed:
            raise _rule(f"parallel.{'*'.join(named)}", fixed, f"must divide the world size {world_size}")
        dp = world_size // fixed if p.dp == -1 else p.dp
        if dp * fixed != world_size:
            with_dp = ["pp", "dp", *named[1:]]
            values = "*".join(str(dp if n == "dp" else getattr(p, n)) for n in with_dp)
            raise _rule(f"parallel.{'*'.join(with_dp)}", values, f"must equal the world size {world_size}")
        if (dp * p.cp * p.tp) % p.ep:
            if p.cp > 1:
                folded = f"dp x cp x tp = {dp}x{p.cp}x{p.tp} (experts fold into the data-, context- and tensor-"
            else:
                folded = f"dp x tp = {dp}x{p.tp} (experts fold into the data- and tensor-"
            raise _rule("parallel.ep", p.ep, f"must divide {folded}parallel ranks)")
        return cls(pp=p.pp, dp=dp, tp=p.tp, ep=p.ep, world_size=world_size, cp=p.cp)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The dense mesh: axes pp, dp (dp x cp ranks), tp (`batch_mesh` flattens dp x tp)."""
        return init_device_mesh(
            device_type,
            (self.pp, self.dp_cp, self.tp),
            mesh_dim_names=(Axis.PP.value, Axis.DP.value, Axis.TP.value),
        )

    def build_context_mesh(self, device_type: str) -> DeviceMesh | None:
        """The mesh (pp, dp, cp, tp) over the same ranks, for its cp groups; None without context parallelism."""
        if self.cp == 1:
            return None
        names = (Axis.PP.value, Axis.DP.value, Axis.CP.value, Axis.TP.value)
        return init_device_mesh(device_type, (self.pp, self.dp, self.cp, self.tp), mesh_dim_names=names)

    @staticmethod
    def batch_mesh(mesh: DeviceMesh) -> DeviceMesh:
        """The dp x tp ranks of `mesh` holding one micro-batch's tokens, as one flattened axis "batch"."""
        return mesh[(Axis.DP.value, Axis.TP.value)]._flatten(Axis.BATCH.value)

    def build_expert_mesh(self, device_type: str) -> DeviceMesh:
        """The experts' mesh over the same ranks: axes pp, edp, ep."""
        return init_device_mesh(
            device_type, (self.pp, self.edp, self.ep), mesh_dim_names=(Axis.PP.value, Axis.EDP.value, Axis.EP.value)
        )
