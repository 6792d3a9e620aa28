"""Tensor parallelism with DTensor's parallel styles.

Attention heads and the dense FFN hidden dim are split column-wise in, row-wise out (Megatron-LM); the
embedding is vocab-parallel (row-wise over the table); the output projection is column-parallel over the
vocabulary and its logits stay sharded for `loss_parallel` cross-entropy, so full logits never exist on one
rank. With sequence parallelism, norms and residuals hold a 1/tp slice of the sequence between blocks.

MoE layers share their work over tp instead of repeating it ("parallel folding"): each tp rank routes and
dispatches its slice of every sequence (the sequence-parallel split; without sequence parallelism the slice
is cut locally and the output all-gathered), and `parallel/expert.py` keeps capacity exact per sequence.
The router and shared experts then see 1/tp of the tokens on each tp rank: `reduce_tp_partial_grads` sums
their gradients over tp.
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from moe.model import Transformer


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shards `model` (or a pipeline stage of it) in place over `tp_mesh`."""
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between_blocks)
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel() if sequence_parallel else None
        top_plan["output"] = ColwiseParallel(
            input_layouts=between_blocks, output_layouts=Shard(-1), use_local_output=False
        )
    parallelize_module(model, tp_mesh, {k: v for k, v in top_plan.items() if v is not None}, src_data_rank=None)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, _block_plan(block.is_moe, sequence_parallel), src_data_rank=None)


def _block_plan(is_moe: bool, sequence_parallel: bool) -> dict:
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    plan = {
        "attention": PrepareModuleInput(
            input_layouts=(between_blocks, None), desired_input_layouts=(Replicate(), None)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=between_blocks),
    }
    if sequence_parallel:
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
    if is_moe:
        # Each tp rank takes its slice of the sequence (a local cut when blocks pass replicated activations).
        plan["moe"] = PrepareModuleInputOutput(
            input_layouts=(between_blocks,),
            desired_input_layouts=(Shard(1),),
            use_local_input=True,
            output_layouts=(Shard(1),),
            desired_output_layouts=(between_blocks,),
            use_local_output=True,
        )
    else:
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(between_blocks,), desired_input_layouts=(Replicate(),))
        plan["feed_forward.w1"] = ColwiseParallel()
        plan["feed_forward.w3"] = ColwiseParallel()
        plan["feed_forward.w2"] = RowwiseParallel(output_layouts=between_blocks)
    return plan


_TP_PARTIAL = re.compile(r"\.moe\.(router|shared_experts)\.")


def is_tp_partial(fqn: str) -> bool:
    """Replicated over tp but fed 1/tp of the tokens on each tp rank: its gradient is a sum over tp."""
    return bool(_TP_PARTIAL.search(fqn))


@torch.no_grad()
def reduce_tp_partial_grads(named_params: list[tuple[str, torch.nn.Parameter]], tp_group) -> None:
    """Sums the MoE router and shared-expert gradients over tp (each tp rank saw its own slice of tokens);
    one flat buffer, since these are small."""
    if tp_group is None:
        return
    grads = [_local(p.grad) for name, p in named_params if p.grad is not None and is_tp_partial(name)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=tp_group)
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def loss_context(tp: int) -> contextlib.AbstractContextManager:
    """Cross-entropy over vocab-sharded logits (needed around the loss and its backward when tp > 1)."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()
