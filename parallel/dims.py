"""ParallelDims: the one place that validates parallel degrees and builds the named DeviceMeshes.

Two meshes over the same ranks, both row-major (Megatron-Core's "parallel folding"):
- dense layers: pp, dp, tp (outermost first); "batch" flattens (dp, tp), the ranks that share one
  micro-batch's tokens. tp is innermost so tensor-parallel ranks share a node.
- experts: pp, edp, ep with edp * ep = dp * tp. ep takes consecutive ranks, so an expert-parallel group
  spans the tp ranks first (their MoE work is split, not repeated) and then neighbouring dp ranks, keeping
  the all-to-all as local as the layout allows; edp ranks hold replicas of the same experts.
"""

from __future__ import annotations

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


def _rule(field: str, value: object, rule: str) -> ValueError:
    return ValueError(f"{field}={value} {rule}")


@dataclass(frozen=True)
class ParallelDims:
    """Validated degrees; `world_size = pp * dp * tp` and `dp * tp = edp * ep`."""

    pp: int
    dp: int
    tp: int
    ep: int
    world_size: int

    @property
    def edp(self) -> int:
        """Replicas of each expert: the dp x tp ranks sharing a micro-batch, over ep."""
        return self.dp * self.tp // self.ep

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_config(cls, p: ParallelConfig, world_size: int) -> ParallelDims:
        """Checks degrees against the world size and infers dp=-1; raises ValueError naming the field."""
        for name in ("tp", "pp", "ep"):
            if getattr(p, name) < 1:
                raise _rule(f"parallel.{name}", getattr(p, name), "must be >= 1")
        if p.dp == 0 or p.dp < -1:
            raise _rule("parallel.dp", p.dp, "must be >= 1, or -1 to infer it from the world size")
        if world_size % (p.pp * p.tp):
            raise _rule("parallel.pp*tp", p.pp * p.tp, f"must divide the world size {world_size}")
        dp = world_size // (p.pp * p.tp) if p.dp == -1 else p.dp
        if p.pp * dp * p.tp != world_size:
            raise _rule("parallel.pp*dp*tp", f"{p.pp}*{dp}*{p.tp}", f"must equal the world size {world_size}")
        if (dp * p.tp) % p.ep:
            raise _rule(
                "parallel.ep",
                p.ep,
                f"must divide dp x tp = {dp}x{p.tp} (experts fold into the data- and tensor-parallel ranks)",
            )
        return cls(pp=p.pp, dp=dp, tp=p.tp, ep=p.ep, world_size=world_size)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The dense mesh: axes pp, dp, tp (`batch_mesh` flattens dp x tp)."""
        return init_device_mesh(
            device_type, (self.pp, self.dp, self.tp), mesh_dim_names=(Axis.PP.value, Axis.DP.value, Axis.TP.value)
        )

    @staticmethod
    def batch_mesh(mesh: DeviceMesh) -> DeviceMesh:
        """The dp x tp ranks of `mesh` holding one micro-batch's tokens, as one flattened axis "batch"."""
        return mesh[(Axis.DP.value, Axis.TP.value)]._flatten(Axis.BATCH.value)

    def build_expert_mesh(self, device_type: str) -> DeviceMesh:
        """The experts' mesh over the same ranks: axes pp, edp, ep."""
        return init_device_mesh(
            device_type, (self.pp, self.edp, self.ep), mesh_dim_names=(Axis.PP.value, Axis.EDP.value, Axis.EP.value)
        )
