"""The one place that reaches for torch APIs newer than the oldest torch MoEyard supports (2.11, pyproject.toml).

Each function detects the feature itself (a parameter in a signature, an attribute), never the version
string: vendors' builds backport and drop features independently of their version number. The rest of the
code calls these and never checks torch's version.

    .venv/bin/pytest -q tests/unit/test_compat.py
"""

from __future__ import annotations

import inspect
from functools import cache

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage


@cache
def stage_takes_grads() -> bool:
    """Whether `PipelineStage` takes the gradients' metadata (`input_grads`/`output_grads`: torch 2.13 has
    them; 2.11 derives the gradients from the inputs' and outputs' metadata)."""
    params = inspect.signature(PipelineStage.__init__).parameters
    return "input_grads" in params and "output_grads" in params


def pipeline_stage(
    module: torch.nn.Module,
    stage_id: int,
    n_stages: int,
    device: torch.device,
    *,
    input_args: torch.Tensor,
    output_args: torch.Tensor,
    input_grads: tuple[torch.Tensor | None, ...],
    output_grads: tuple[torch.Tensor, ...],
    group: dist.ProcessGroup,
) -> PipelineStage:
    """A `PipelineStage` with its inputs and outputs declared, and its gradients too where torch takes them
    (where it does not, it derives them from the declared outputs, which is what they are here)."""
    grads = {"input_grads": input_grads, "output_grads": output_grads} if stage_takes_grads() else {}
    return PipelineStage(
        module, stage_id, n_stages, device, input_args=input_args, output_args=output_args, group=group, **grads
    )


NEWER_COLLECTIVES = ("all_gather_single", "reduce_scatter_single")
"""torch.distributed collectives added after 2.11 (FSDP2 gathers and reduce-scatters through them where they
exist): the collective log wraps whichever of them this torch has."""


def all_gather_into(output: torch.Tensor, local: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Every rank's `local`, concatenated along dim 0 into `output` (`all_gather_single` where torch has it:
    2.13 deprecates `all_gather_into_tensor`, which 2.11 has alone)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, local, group=group)


def reduce_scatter_into(output: torch.Tensor, whole: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    """This rank's dim-0 slice of `whole` summed over the group, into `output` (`reduce_scatter_single` where
    torch has it: 2.13 deprecates `reduce_scatter_tensor`, which 2.11 has alone)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, whole, group=group)
