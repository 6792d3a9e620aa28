"""Peak memory of every rank of a layout: exact model state, activations by formula, buffers, fixed overheads.

peak = params + gradients + optimizer state   (parallel/memory.py: counted from the model built on the meta
                                                device under the layout; exact; AdamW's two moments, or
                                                optim=muon's one momentum buffer for Muon's parameters)
     + saved activations of the micro-batches the schedule keeps in flight (activations.py, per block)
     + the largest backward working set on top of them (the loss's, or a block's, with its recomputation)
     + buffers: pipeline receive buffers (one per micro-batch and direction, kept by torch's pipelining) and
       the stage outputs it keeps until their backward (the last stage's logits too, only while in flight),
       FSDP's gathered copies (root unit and two blocks) and what it holds across micro-batches (each unit's
       accumulated unsharded gradient; under a pipeline every block's gathered parameters too)
     + fixed: CUDA context, workspaces and NCCL buffers, and allocator fragmentation (cluster.py's table)

Micro-batches in flight per pipeline rank r of pp (m micro-batches): one without a pipeline, m under GPipe,
min(m, pp - r) under 1F1B; interleaved 1F1B runs torch's warmup of (v - 1) pp + 2 (pp - 1 - r) forwards of
its v local stages before its first backward, so the first warmup + 1 forwards in its order are in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.parallel.config import ParallelConfig, uses_fsdp
from moeyard.parallel.dims import ParallelDims
from moeyard.parallel.memory import RankMemory
from moeyard.parallel.pipeline import local_stage_ids, stage_layer_ranges
from moeyard.plan.activations import (
    FP32,
    Shape,
    block_backward_bytes,
    block_bytes,
    embedding_bytes,
    head_backward_bytes,
    head_bytes,
    scratch_bytes,
)


@dataclass(frozen=True)
class RankPeak:
    """Predicted peak memory of one pipeline position's ranks, in bytes, by part."""

    pp_rank: int
    state: RankMemory
    activations: int
    """Saved tensors of the micro-batches in flight."""
    working: int
    """The backward working set at the peak (loss gradients, a block's, recomputed tensors)."""
    buffers: int
    """Pipeline receive buffers and kept stage outputs, FSDP's gathered copies."""
    parts: dict[str, int] = field(default_factory=dict)
    """activations by part, summed over the micro-batches in flight (for the table's breakdown)."""

    @property
    def params(self) -> int:
        return self.state.param_bytes * self.state.params

    @property
    def grads(self) -> int:
        return self.state.param_bytes * self.state.params

    @property
    def optimizer(self) -> int:
        return self.state.state_bytes - 2 * self.params

    @property
    def model_state(self) -> int:
        return self.state.state_bytes

    @property
    def total(self) -> int:
        """Everything but the fixed device overheads."""
        return self.model_state + self.activations + self.working + self.buffers


def in_flight(schedule: str, pp: int, pp_rank: int, micro: int, vpp: int) -> list[int]:
    """Micro-batches each local stage of pipeline rank `pp_rank` holds at once (module docstring)."""
    if pp == 1:
        return [1]
    if schedule == "gpipe":
        return [micro] * vpp
    if schedule == "1f1b":
        return [min(micro, pp - pp_rank)]
    warmup = min((vpp - 1) * pp + 2 * (pp - 1 - pp_rank), micro * vpp)
    counts = [0] * vpp
    for i in range(warmup + 1):  # forward order: groups of pp micro-batches, each through every local stage
        counts[(i // pp) % vpp] += 1
    return counts


def checkpointed(pcfg: ParallelConfig, layer: int) -> bool:
    """Whether activation checkpointing wraps block `layer`."""
    mode = pcfg.activation_checkpoint
    return mode == "full" or (mode == "selective" and layer % pcfg.ac_every == 0)


def signature(model: ModelConfig, pcfg: ParallelConfig, layers: tuple[int, int]) -> tuple:
    """What a stage's cost depends on besides the layout: each block's kind and whether it is checkpointed."""
    return tuple((model.is_moe_layer(i), checkpointed(pcfg, i)) for i in range(*layers))


def rank_peak(
    model: ModelConfig,
    moe: MoEConfig,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    shape: Shape,
    micro: int,
    pp_rank: int,
    state: RankMemory,
    fsdp_bf16: bool = False,
    cache: dict | None = None,
) -> RankPeak:
    """The predicted peak of the ranks at pipeline position `pp_rank` (module docstring); `cache` may carry
    stage results between the pipeline ranks of one layout."""
    cache = {} if cache is None else cache
    vpp = pcfg.pp_stages_per_rank if dims.pp > 1 else 1
    n_stages = dims.pp * vpp
    ranges = stage_layer_ranges(model.n_layers, n_stages, pcfg.pp_layers)
    stage_ids = local_stage_ids(pp_rank, dims.pp, vpp) if dims.pp > 1 else [0]
    counts = in_flight(pcfg.pp_schedule, dims.pp, pp_rank, micro, vpp)
    hidden = shape.rows * (shape.seq // shape.tp if shape.sp else shape.seq) * model.dim * shape.res
    logits = shape.tokens * (model.vocab_size // shape.tp) * shape.act
    fsdp = uses_fsdp(pcfg.dp_mode, dims.dp_cp)
    zero2 = pcfg.dp_mode == "zero2"  # gathered once a step, reduce-scattered every micro-batch (data_parallel.py)
    hold = pcfg.fsdp_hold == "step" and not zero2
    gathered = _fsdp_gathered(model, shape, state, fsdp_bf16, (dims.pp > 1 and hold) or zero2) if fsdp else None
    working, buffers, parts, one_micro = 0, 0, {}, 0
    for sid, count in zip(stage_ids, counts, strict=True):
        first, last = sid == 0, sid == n_stages - 1
        key = ("stage", signature(model, pcfg, ranges[sid]), first, last, gathered)
        if key not in cache:
            cache[key] = _stage(model, moe, pcfg, shape, ranges[sid], first, last, gathered)
        saved, over = dict(cache[key][0]), cache[key][1]
        if sid > 0:  # the first block's input is its receive buffer, counted below; the gradient sent back
            saved["norm"] -= hidden
            buffers += micro * hidden + (hidden if pcfg.pp_schedule != "gpipe" else 0)
        if sid < n_stages - 1:
            buffers += micro * hidden + count * hidden  # gradient receive buffers; outputs kept for backward
        elif dims.pp > 1:
            # The last stage's logits, held by torch's schedule until their backward (the trainer asks it for
            # no outputs, so none is kept until the step ends).
            buffers += count * logits
        for name, value in saved.items():
            parts[name] = parts.get(name, 0) + count * value
        one_micro += sum(saved.values())
        working = max(working, over)
    if fsdp:
        buffers += _fsdp_held(state, dims.pp, micro, max(counts), one_micro, fsdp_bf16, hold, zero2)
    return RankPeak(pp_rank, state, sum(parts.values()), working, buffers, parts)


def _fsdp_gathered(model: ModelConfig, shape: Shape, state: RankMemory, bf16: bool, pipelined: bool) -> tuple[int, int]:
    """FSDP's extra bytes on top of the saved tensors: (while the loss runs backward: the root unit gathered;
    while a block's backward starts: the root unit, the output's unsharded gradient, the block's all-gather
    buffer and its unsharded parameters). Under a pipeline the blocks stay gathered through the step
    (`_fsdp_held` counts them) and none is gathered again for backward."""
    per = 2 if bf16 else FP32
    root = per * state.gathered_root
    output_grad = per * (model.vocab_size // shape.tp) * model.dim if state.gathered_root else 0
    return root, root + output_grad + (0 if pipelined else 2 * per * state.gathered_block)


def _fsdp_held(
    state: RankMemory, pp: int, micro: int, in_flight: int, one_micro: int, bf16: bool, hold: bool, zero2: bool = False
) -> int:
    """FSDP's bytes held across the step's micro-batches, on top of the peak's saved tensors.

    Under a pipeline the blocks' gathered parameters stay from their first forward to their last backward
    (`data_parallel.gathered_through_step`; the root's are counted in `_fsdp_gathered`). With more than one
    micro-batch, every unit's unsharded gradient accumulates in fp32 (the reduce dtype) from the first
    backward until the last micro-batch's backward reduce-scatters it, once a step
    (`data_parallel.sync_grads_now`; torch's pipeline stages do the same). They first coexist with the most
    micro-batches in flight only if a forward follows a backward (more micro-batches than in flight, 1F1B's
    steady state); otherwise the first backward has freed one micro-batch's saved tensors (`one_micro`).
    With `parallel.fsdp_hold=micro_batch` (`hold` False) blocks reshard after each forward, and only torch's
    pipeline stages still hold gradients across micro-batches. dp_mode=zero2 holds every block's parameters
    through the step, pipeline or not, and reduce-scatters every micro-batch's gradients (`hold` False: only
    torch's pipeline stages hold them).
    """
    params = (2 if bf16 else FP32) * state.gathered_blocks if (pp > 1 and hold) or zero2 else 0
    held_grads = micro > 1 and (hold or pp > 1)  # parallel.fsdp_hold=micro_batch reduces each micro-batch's
    grads = FP32 * (state.gathered_root + state.gathered_blocks) if held_grads else 0
    return params + (grads if micro > in_flight else max(0, grads - one_micro))


def _stage(
    model: ModelConfig,
    moe: MoEConfig,
    pcfg: ParallelConfig,
    shape: Shape,
    layers: tuple[int, int],
    first: bool,
    last: bool,
    fsdp: tuple[int, int] | None,
) -> tuple[dict[str, int], int]:
    """What one micro-batch of this stage saves, by part, and the most its backward adds on top of that.

    Backward runs the loss first (all saved tensors, plus its gradients), then the blocks in reverse, each
    freeing what it saved when done: block j's backward holds the saved tensors of blocks 0..j (block j's in
    full, recomputed if checkpointed) and its working gradients. Under FSDP each phase also holds gathered
    parameters (`_fsdp_gathered`).
    """
    block_input = shape.norm_tokens * model.dim * shape.res
    parts = {"embedding": embedding_bytes(shape) if first else 0, "norm": 0}
    kept = []  # per block: (what it keeps until its backward, what its backward holds at most)
    kinds = {k: (block_bytes(model, moe, shape, k), block_backward_bytes(model, moe, shape, k)) for k in (False, True)}
    for layer in range(*layers):
        full, backward = kinds[model.is_moe_layer(layer)]
        if checkpointed(pcfg, layer):
            parts["checkpointed"] = parts.get("checkpointed", 0) + block_input
            kept.append((block_input, sum(full.values()) + backward))
            continue
        for name, value in full.items():
            parts[name] = parts.get(name, 0) + value
        kept.append((sum(full.values()), sum(full.values()) + backward))
    head = head_bytes(model, shape) if last else 0
    parts["head"] = head
    saved = sum(parts.values())
    loss_extra, block_extra = fsdp or (0, 0)
    over = head_backward_bytes(model, shape) + loss_extra if last else 0
    live = saved - head
    for block_kept, block_peak in reversed(kept):
        over = max(over, live - block_kept + block_peak - saved, live + block_input + block_extra - saved)
        live -= block_kept
    if any(model.is_moe_layer(layer) for layer in range(*layers)):
        over += scratch_bytes(model, moe, shape)  # kept from the first backward on, so under every peak
    return parts, over
