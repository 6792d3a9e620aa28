"""ParallelDims: the one place that validates parallel degrees and builds the named DeviceMesh.

Mesh layout (outermost first): pp, edp, ep, tp. Dense layers see data parallelism over the flattened
(edp, ep) axis "dp"; MoE experts are sharded over "ep" and replicated over "edp" (Megatron's "parallel
folding", torchtitan's EP-within-DP). tp is innermost so tensor-parallel ranks share a node; ep sits next
so the all-to-all stays as local as the layout allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.config import ParallelConfig


class Axis(str, Enum):
    """Mesh axis names."""

    PP = "pp"
    DP = "dp"
    EDP = "edp"
    EP = "ep"
    TP = "tp"


def _rule(field: str, value: object, rule: str) -> ValueError:
    return ValueError(f"{field}={value} {rule}")


@dataclass(frozen=True)
class ParallelDims:
    """Validated degrees; `world_size = pp * dp * tp` and `dp = edp * ep`."""

    pp: int
    dp: int
    tp: int
    ep: int
    world_size: int

    @property
    def edp(self) -> int:
        return self.dp // self.ep

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
        if dp % p.ep:
            raise _rule("parallel.ep", p.ep, f"must divide the data-parallel degree dp={dp} (experts fold into dp)")
        return cls(pp=p.pp, dp=dp, tp=p.tp, ep=p.ep, world_size=world_size)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The world mesh with axes pp, edp, ep, tp and the flattened dp = (edp, ep)."""
        mesh = init_device_mesh(
            device_type,
            (self.pp, self.edp, self.ep, self.tp),
            mesh_dim_names=(Axis.PP.value, Axis.EDP.value, Axis.EP.value, Axis.TP.value),
        )
        mesh[(Axis.EDP.value, Axis.EP.value)]._flatten(Axis.DP.value)
        return mesh
