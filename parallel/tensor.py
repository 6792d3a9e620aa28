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

Attention variants (moe/attention.py):
- GQA's q/k/v biases are split with their projections' rows. A per-head q/k norm (qk_norm=head) is one
  [Hd] weight shared by all heads, replicated: each rank normalises only its heads, so its gradient is
  tp-partial like the router's. A full-width q/k norm (qk_norm=full) normalises the whole projection output,
  which tp splits by heads: its weight is sharded like the projection's rows and it runs on DTensors, so the
  mean of squares is a Partial value that one all-reduce of [B, S, 1] completes (no all-gather of q or k).
  gpt-oss: attention sinks [H] are sharded with the heads (`_HeadSharded`); o_proj's bias stays replicated
  and is added once, after RowwiseParallel's reduction (DTensor's linear); sliding windows need nothing.
- MLA: the up-projections (wq_b, or wq without a query bottleneck, and wkv_b) are column-parallel over heads
  and wo row-parallel; the down-projections wq_a, wkv_a and the latent norms are replicated (small, and
  every head needs the whole latent). Column-parallel layers sum their input's gradient over tp, so the
  latents' gradients are whole; the rotary key (wkv_a's last R outputs), shared by all heads, reaches the
  heads directly, and `_SumGradOverTp` sums its gradient over tp.
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from moeyard.moe.config import ModelConfig
from moeyard.moe.model import Transformer


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shards `model` (or a pipeline stage of it) in place over `tp_mesh`."""
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = VocabParallelEmbedding(between_blocks)
    if model.norm is not None:
        top_plan["norm"] = SequenceParallel() if sequence_parallel else None
        top_plan["output"] = ColwiseParallel(
            input_layouts=between_blocks, output_layouts=Shard(-1), use_local_output=False
        )
    parallelize_module(model, tp_mesh, {k: v for k, v in top_plan.items() if v is not None}, src_data_rank=None)
    for block in model.layers.values():
        plan = _block_plan(model.cfg, block.is_moe, sequence_parallel)
        parallelize_module(block, tp_mesh, plan, src_data_rank=None)


def _attention_plan(cfg: ModelConfig, between_blocks: Shard | Replicate) -> dict:
    """The plan of a block's `attention` module: GQA (with its q/k norm) or MLA."""
    if cfg.attention == "mla":
        return {
            # Local inputs: the replicated down-projections are plain modules and take no DTensor.
            "attention": PrepareModuleInput(
                input_layouts=(between_blocks, None), desired_input_layouts=(Replicate(), None), use_local_output=True
            ),
            "attention.wq" if cfg.q_lora_rank == 0 else "attention.wq_b": ColwiseParallel(),
            "attention.wkv_a": _SumGradOverTp(last=cfg.qk_rope_head_dim),
            "attention.wkv_b": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=between_blocks),
        }
    plan = {
        "attention": PrepareModuleInput(
            input_layouts=(between_blocks, None), desired_input_layouts=(Replicate(), None)
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=between_blocks),
    }
    if cfg.qk_norm == "full":
        plan["attention.q_norm"] = _FullWidthNorm()
        plan["attention.k_norm"] = _FullWidthNorm()
    if cfg.attention_sinks:
        plan["attention.sinks"] = _HeadSharded()
    return plan


def _block_plan(cfg: ModelConfig, is_moe: bool, sequence_parallel: bool) -> dict:
    between_blocks = Shard(1) if sequence_parallel else Replicate()
    plan = _attention_plan(cfg, between_blocks)
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


class VocabParallelEmbedding(ParallelStyle):
    """An nn.Embedding split over tp by rows (vocabulary) whose gradient stays split; output `output_layout`
    (Replicate, or Shard(1) over the sequence with sequence parallelism), as a local tensor.

    torch's RowwiseParallel computes the same forward, but DTensor's embedding backward returns the table's
    gradient Replicate: the whole [V, D] on every tp rank (torch 2.13), kept until the optimizer step. Here
    each rank looks up only its own rows (other ids read row 0 and are zeroed) and the Partial outputs are
    summed, or reduce-scattered over the sequence: the table's gradient is this rank's [V/tp, D] rows, and no
    rank scatters gradients into rows it does not own (Megatron-LM's VocabParallelEmbedding).
    """

    def __init__(self, output_layout: Shard | Replicate) -> None:
        super().__init__()
        self.output_layout = output_layout

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sharded = distribute_tensor(module.weight, device_mesh, [Shard(0)], src_data_rank=self.src_data_rank)
        module.register_parameter("weight", nn.Parameter(sharded))
        layout = self.output_layout

        def forward(ids: torch.Tensor) -> torch.Tensor:
            local = module.weight.to_local()
            start = device_mesh.get_local_rank() * local.shape[0]  # validation: tp divides the vocabulary
            outside = (ids < start) | (ids >= start + local.shape[0])
            rows = nn.functional.embedding((ids - start).masked_fill(outside, 0), local)
            rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)
            partial = DTensor.from_local(rows, device_mesh, [Partial()], run_check=False)
            return partial.redistribute(device_mesh, [layout]).to_local()

        module.forward = forward
        return module


def _shard_rows(name: str, mod: nn.Module, mesh: DeviceMesh, src_data_rank: int | None) -> None:
    """distribute_module's partition_fn: each of `mod`'s own parameters sharded on dim 0 over `mesh`."""
    for pname, param in list(mod.named_parameters(recurse=False)):
        sharded = distribute_tensor(param, mesh, [Shard(0)], src_data_rank=src_data_rank)
        mod.register_parameter(pname, nn.Parameter(sharded))


class _FullWidthNorm(ParallelStyle):
    """A norm over the last dim of a column-parallel output (OLMoE's q/k norm): the weight is sharded like the
    projection's rows, the input is this rank's slice of the last dim, and the norm runs on DTensors, which
    turn the mean of squares into one all-reduce (`PlainRMSNorm` in moe/attention.py). Output: local."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        shard_weight = functools.partial(_shard_rows, src_data_rank=self.src_data_rank)
        return distribute_module(
            module,
            device_mesh,
            partition_fn=shard_weight,
            input_fn=lambda mod, inputs, mesh: (DTensor.from_local(inputs[0], mesh, [Shard(-1)], run_check=False),),
            output_fn=lambda mod, out, mesh: out.to_local(),
        )


class _HeadSharded(ParallelStyle):
    """A per-head parameter module (attention sinks [H]): its weight sharded over tp like the heads of the
    column-parallel q projection (Shard(0): rank r keeps heads [r H/tp, (r+1) H/tp)); the attention receives the
    local slice. Each head's logit is used only by the rank holding the head, so its gradient is local too."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        shard_weight = functools.partial(_shard_rows, src_data_rank=self.src_data_rank)
        return distribute_module(
            module, device_mesh, partition_fn=shard_weight, output_fn=lambda mod, out, mesh: out.to_local()
        )


class _SumGradOverTp(ParallelStyle):
    """Leaves a replicated module (plain weights) as it is, but sums over tp the gradient of the `last` output
    channels, which every rank uses for its own heads only (MLA's rotary key): identity forward, all-reduce
    backward (Megatron's "copy to tensor-parallel region"), as a Replicate DTensor whose gradient is Partial."""

    def __init__(self, last: int) -> None:
        super().__init__()
        self.last = last

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
            own, shared = out.split([out.shape[-1] - self.last, self.last], dim=-1)
            shared = DTensor.from_local(shared, device_mesh, [Replicate()], run_check=False)
            return torch.cat([own, shared.to_local(grad_placements=[Partial()])], dim=-1)

        module.register_forward_hook(hook)
        return module


_TP_PARTIAL = re.compile(r"\.moe\.(router|shared_experts|shared_expert_gate)\.|\.attention\.[qk]_head_norm\.")


def is_tp_partial(fqn: str) -> bool:
    """Replicated over tp but fed 1/tp of the tokens (MoE router, shared experts and their gate) or of the heads
    (per-head q/k norms) on each tp rank: its gradient is a sum over tp."""
    return bool(_TP_PARTIAL.search(fqn))


@torch.no_grad()
def reduce_tp_partial_grads(named_params: list[tuple[str, torch.nn.Parameter]], tp_group) -> None:
    """Sums the `is_tp_partial` gradients over tp (each tp rank saw its own slice of tokens or heads); one flat
    buffer, since these are small."""
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
