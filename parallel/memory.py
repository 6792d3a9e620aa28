"""Model-state memory per rank, on paper: one rank's model built on the meta device, its local shards counted.

`meta_rank` builds any rank of a job of any size in this one process: a fake process group (no peers, no
communication) stands in for the job and the meta device for the GPU, so even a 672 B-parameter model costs
no memory. `rank_memory` then counts what that rank holds while it trains:

- model state, 16 B per local parameter element: the fp32 master weight, its fp32 gradient and AdamW's two
  fp32 moments (fused AdamW, the CUDA default, adds no per-element temporaries); under optim=muon, 12 B per
  element of Muon's parameters (one fp32 momentum buffer, no step counter: parallel/muon.py); under
  parallel.dp_mode=zero1 the two moments (8 B) on this rank's dp/edp slice of each parameter only, and under
  parallel.param_dtype=bf16 a 2 B parameter and 2 B gradient per element and a 4 B fp32 master per element
  of the slice (parallel/zero.py); zero2 is FSDP's count (its parameters rest sharded);
- FSDP's transient copies, per element of a gathered unit (its TP and EP shard, no longer split over dp or
  edp): the bf16 parameter, its bf16 gradient and the fp32 reduce-scatter input, 2 + 2 + 4 = 8 B (fp32
  training: 12 B). Counted are the root unit (embedding, final norm, output: FSDP2 keeps the root gathered
  from forward to backward) and two blocks with their experts, the one running and the one prefetched.

Activations are not counted here: they depend on the batch, the schedule and checkpointing (the planner,
launch/plan/memory.py, predicts them).

`stage_memory` gives the same count for any rank of any layout without building the whole rank: the shards
of one block of each kind and of the embedding, final norm and output come from a small model built on the
meta device under the layout's tp and ep (`probe_shards`), FSDP's split of each over dp (dense) or edp
(experts) follows torch.chunk as FSDP2 does, and a pipeline rank adds up the blocks of its stages.
tests/unit/test_plan_state.py checks it against `rank_memory` of full builds, element for element, and
tests/multiproc/test_plan_cpu.py against the bytes of real ranks' parameters, gradients and AdamW state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from math import gcd, prod

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.parallel.config import ParallelConfig, uses_fsdp
from moeyard.parallel.data_parallel import expert_shard, is_expert_param
from moeyard.parallel.dims import Axis, ParallelDims
from moeyard.parallel.muon import takes_muon
from moeyard.parallel.parallelize import ParallelModel, build_parallel_model
from moeyard.parallel.pipeline import local_stage_ids, stage_layer_ranges
from moeyard.parallel.zero import chunk_bounds, owned_dim

STATE_BYTES = 16
"""fp32 parameter + fp32 gradient + AdamW exp_avg + exp_avg_sq, per local element."""
STEP_BYTES = 4
"""AdamW's `step` counter: one fp32 scalar tensor per parameter tensor."""
FP32_MASTER = 4
"""An fp32 element: the parameter itself in fp32 training, its master copy under parallel.param_dtype=bf16."""
MUON_SAVES = 4
"""Bytes per element Muon's one momentum buffer saves against AdamW's two moments."""
_FSDP_AXES = (Axis.DP.value, Axis.EDP.value)


@dataclass(frozen=True)
class RankMemory:
    """What one rank holds, in elements, and what it costs, in bytes."""

    params: int
    """Elements of this rank's local parameter shards."""
    gathered_root: int
    """Elements of the root FSDP unit (embedding, final norm, output) once gathered; 0 on a middle stage."""
    gathered_block: int
    """Elements of this rank's largest block, its experts included, once gathered."""
    bf16: bool
    """FSDP gathers bf16 parameters (train.dtype=bf16) rather than fp32 ones."""
    tensors: int = 0
    """Parameter tensors this rank holds (each has an AdamW step counter)."""
    gathered_blocks: int = 0
    """Elements of all this rank's blocks, their experts included, once gathered (what FSDP holds across
    micro-batches: their accumulated gradients, and under a pipeline their parameters)."""
    muon_params: int = 0
    """Of `params`, the elements Muon updates (optim=muon): one momentum buffer instead of two moments."""
    muon_tensors: int = 0
    """Of `tensors`, those Muon updates (no step counter)."""
    optimizer_params: int | None = None
    """Elements AdamW's moments cover when not every local one: under dp_mode=zero1 this rank's slices
    (parallel/zero.py; the first rank's, torch.chunk's largest). None: every local parameter element."""
    param_bytes: int = 4
    """Bytes of a parameter element and of its gradient's: 2 under parallel.param_dtype=bf16, whose fp32
    master (4 B) the optimizer keeps beside the moments, on their elements."""

    @property
    def state_bytes(self) -> int:
        adamw_tensors = self.tensors - self.muon_tensors
        owned = self.params if self.optimizer_params is None else self.optimizer_params
        master = FP32_MASTER if self.param_bytes < FP32_MASTER else 0  # fp32 parameters are their own master
        per_owned = STATE_BYTES - 2 * FP32_MASTER + master  # the two moments, and a separate master
        params_and_grads = 2 * self.param_bytes * self.params
        return params_and_grads + per_owned * owned - MUON_SAVES * self.muon_params + STEP_BYTES * adamw_tensors

    @property
    def transient_bytes(self) -> int:
        per_element = (2 + 2 if self.bf16 else 4 + 4) + 4  # parameter, gradient, fp32 reduce-scatter input
        return per_element * (self.gathered_root + 2 * self.gathered_block)

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.transient_bytes


def local_numel(param: torch.Tensor) -> int:
    """Elements this rank stores of `param` (a DTensor's local shard)."""
    return (param.to_local() if isinstance(param, DTensor) else param).numel()


def _sharded_axes(param: torch.Tensor) -> list[tuple[str, int]]:
    """(mesh axis name, size) of each axis a DTensor is split over; none for a plain tensor."""
    if not isinstance(param, DTensor):
        return []
    mesh = param.device_mesh
    names = mesh.mesh_dim_names or ()
    # Not `is_shard()`: FSDP over a tensor-parallel dim 0 places a _StridedShard, which is not a Shard.
    split = [not (p.is_replicate() or p.is_partial()) for p in param.placements]
    return [(names[i], mesh.size(i)) for i, s in enumerate(split) if s]


def shard_count(name: str, param: torch.Tensor, ep: int) -> int:
    """Different shards of parameter `name` among the ranks of its pipeline stage (TP x FSDP, times ep for
    experts, whose tensor on a rank is already its ep block of E/ep experts)."""
    return prod(size for _, size in _sharded_axes(param)) * (ep if is_expert_param(name) else 1)


def gathered_numel(param: torch.Tensor) -> int:
    """Elements of `param` on this rank while FSDP has gathered it (TP and EP shards stay split).

    Assumes even FSDP shards, which the shipped presets have (tests/unit/test_presets_fit.py checks it).
    """
    return local_numel(param) * prod(size for axis, size in _sharded_axes(param) if axis in _FSDP_AXES)


def rank_memory(pm: ParallelModel, bf16: bool, muon: bool = False, pcfg: ParallelConfig | None = None) -> RankMemory:
    """Counts this rank's parameter shards and FSDP's gathered units (see the module docstring); `muon`:
    optim=muon's state; `pcfg`: the layout's dp_mode and param_dtype (zero1 slices, bf16 parameters)."""
    root, blocks = 0, {}
    for name, param in pm.named_parameters():
        if name.startswith("layers."):
            lid = name.split(".")[1]
            blocks[lid] = blocks.get(lid, 0) + gathered_numel(param)
        else:
            root += gathered_numel(param)
    return RankMemory(
        params=sum(local_numel(p) for _, p in pm.named_parameters()),
        gathered_root=root,
        gathered_block=max(blocks.values(), default=0),
        gathered_blocks=sum(blocks.values()),
        bf16=bf16,
        tensors=len(pm.named_parameters()),
        muon_params=sum(local_numel(p) for n, p in pm.named_parameters() if muon and takes_muon(n, p.ndim)),
        muon_tensors=sum(muon and takes_muon(n, p.ndim) for n, p in pm.named_parameters()),
        **_zero_fields(pcfg, pm.dims, [(n, tuple(_local(p).shape)) for n, p in pm.named_parameters()]),
    )


def zero_owned(name: str, shape: tuple[int, ...], dims: ParallelDims) -> int:
    """Elements of the first (largest) dp_mode=zero1 slice of a local tensor of `shape` (parallel/zero.py):
    split over edp for experts, over dp (its dp x cp ranks) otherwise."""
    ways = dims.edp if is_expert_param(name) else dims.dp_cp
    dim = owned_dim(torch.Size(shape), ways)
    return chunk_bounds(shape[dim], ways, 0)[1] * prod(shape) // shape[dim]


def _zero_fields(pcfg: ParallelConfig | None, dims: ParallelDims, shapes: list[tuple[str, tuple[int, ...]]]) -> dict:
    """RankMemory's optimizer_params and param_bytes under `pcfg` (defaults without one)."""
    if pcfg is None:
        return {}
    owned = sum(zero_owned(n, shape, dims) for n, shape in shapes) if pcfg.dp_mode == "zero1" else None
    bf16 = pcfg.param_dtype == "bf16" and not uses_fsdp(pcfg.dp_mode, dims.dp_cp)
    return {"optimizer_params": owned, "param_bytes": 2 if bf16 else FP32_MASTER}


@contextmanager
def meta_rank(
    model_cfg: ModelConfig,
    moe_cfg: MoEConfig,
    pcfg: ParallelConfig,
    world_size: int,
    rank: int,
    bf16: bool = True,
) -> Iterator[ParallelModel]:
    """Rank `rank` of a `world_size`-rank job, built on the meta device under a fake process group.

    Nothing is allocated and nothing is communicated. The process must not be in a process group already;
    the fake one is destroyed on exit, so the next rank can be built after it.
    """
    dims = ParallelDims.from_config(pcfg, world_size)
    dist.init_process_group("fake", rank=rank, world_size=world_size)
    try:
        # The mesh's device type only names where collectives would run; the fake group runs none.
        mesh = dims.build_mesh("cpu") if dims.is_distributed else None
        expert_mesh = dims.build_expert_mesh("cpu") if dims.is_distributed else None
        yield build_parallel_model(
            model_cfg, moe_cfg, pcfg, dims, mesh, expert_mesh, torch.device("meta"), seed=0, bf16=bf16, init=False
        )
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class LocalShape:
    """One parameter's shard on a rank under tp and ep, before FSDP splits it."""

    name: str
    shape: tuple[int, ...]
    expert: bool
    """An expert weight: FSDP splits it over edp, every other parameter over dp."""


@dataclass(frozen=True)
class ShardProbe:
    """The local shapes of one block of each kind and of the embedding and head, under one (tp, ep)."""

    blocks: dict[bool, tuple[LocalShape, ...]]
    """is_moe -> the parameters of one such block."""
    embedding: tuple[LocalShape, ...]
    head: tuple[LocalShape, ...]
    """The final norm and the output projection (none of its own when tied to the embedding)."""


def probe_shards(model_cfg: ModelConfig, moe_cfg: MoEConfig, pcfg: ParallelConfig, tp: int, ep: int) -> ShardProbe:
    """Builds a model of one dense and/or one MoE block (the kinds `model_cfg` has) on the meta device under
    tensor parallelism tp and expert parallelism ep, and reads the shapes of its rank-0 shards."""
    kinds = sorted({model_cfg.is_moe_layer(i) for i in range(model_cfg.n_layers)})
    # Two blocks, and a short rotary table (its length changes no parameter): the build takes a fraction of a
    # second whatever the model.
    probe_model = replace(
        model_cfg,
        n_layers=len(kinds),
        first_dense_layers=int(not kinds[-1] or len(kinds) == 2),
        moe_every=1,
        max_seq_len=2,
    )
    dp = ep // gcd(ep, tp)  # the fewest dp ranks that fold ep (ep divides dp * tp)
    probe_pcfg = replace(pcfg, tp=tp, ep=ep, pp=1, dp=dp, cp=1, dp_mode="replicate", pp_layers=[], pp_stages_per_rank=1)
    with meta_rank(probe_model, moe_cfg, probe_pcfg, tp * dp, 0) as pm:
        params = [(name, tuple(_local(p).shape)) for name, p in pm.named_parameters()]
    blocks: dict[bool, list[LocalShape]] = {kind: [] for kind in kinds}
    embedding, head = [], []
    for name, shape in params:
        shard = LocalShape(name, shape, is_expert_param(name))
        if name.startswith("layers."):
            blocks[kinds[int(name.split(".")[1])]].append(shard)
        else:
            (embedding if name.startswith("tok_embeddings.") else head).append(shard)
    return ShardProbe({k: tuple(v) for k, v in blocks.items()}, tuple(embedding), tuple(head))


def fsdp_chunk_numel(shape: tuple[int, ...], ways: int) -> int:
    """Elements of FSDP2's first (largest) shard of `shape` split `ways` ways along dim 0 (torch.chunk)."""
    rows = min(shape[0], -(-shape[0] // ways)) if shape else 1
    return rows * prod(shape[1:])


def _fsdp_numel(shard: LocalShape, ways: int) -> int:
    """Elements of FSDP's first shard of `shard` split `ways` ways (experts along `expert_shard`'s dim)."""
    if ways > 1 and shard.expert and expert_shard(torch.Size(shard.shape), ways) == Shard(1):
        return prod(shard.shape) // ways
    return fsdp_chunk_numel(shard.shape, ways)


def _stage_shards(
    probe: ShardProbe, model_cfg: ModelConfig, pcfg: ParallelConfig, dims: ParallelDims, pp_rank: int
) -> tuple[list[tuple[LocalShape, ...]], tuple[LocalShape, ...]]:
    """(the blocks' shards, the embedding's and head's shards) of a rank at pipeline position `pp_rank`."""
    stages = dims.pp * pcfg.pp_stages_per_rank
    ranges = stage_layer_ranges(model_cfg.n_layers, stages, pcfg.pp_layers)
    stage_ids = local_stage_ids(pp_rank, dims.pp, pcfg.pp_stages_per_rank) if dims.pp > 1 else [0]
    blocks = [probe.blocks[model_cfg.is_moe_layer(i)] for sid in stage_ids for i in range(*ranges[sid])]
    root = (probe.embedding if 0 in stage_ids else ()) + (probe.head if stages - 1 in stage_ids else ())
    return blocks, root


def stage_memory(
    probe: ShardProbe,
    model_cfg: ModelConfig,
    pcfg: ParallelConfig,
    dims: ParallelDims,
    pp_rank: int,
    bf16: bool,
    muon: bool = False,
) -> RankMemory:
    """`rank_memory` of any rank at pipeline position `pp_rank`, from the probe's shapes (module docstring)."""
    blocks, root = _stage_shards(probe, model_cfg, pcfg, dims, pp_rank)
    fsdp = uses_fsdp(pcfg.dp_mode, dims.dp_cp)
    ways = {False: dims.dp_cp if fsdp else 1, True: dims.edp if fsdp else 1}
    gathered = lambda shards: sum(prod(s.shape) for s in shards)
    muon_shards = [s for shards in (*blocks, root) for s in shards if muon and takes_muon(s.name, len(s.shape))]
    return RankMemory(
        params=sum(_fsdp_numel(s, ways[s.expert]) for shards in (*blocks, root) for s in shards),
        gathered_root=gathered(root),
        gathered_block=max((gathered(block) for block in blocks), default=0),
        gathered_blocks=sum(gathered(block) for block in blocks),
        bf16=bf16,
        tensors=sum(len(shards) for shards in (*blocks, root)),
        muon_params=sum(_fsdp_numel(s, ways[s.expert]) for s in muon_shards),
        muon_tensors=len(muon_shards),
        **_zero_fields(pcfg, dims, [(s.name, s.shape) for shards in (*blocks, root) for s in shards]),
    )


def stage_param_split(
    probe: ShardProbe, model_cfg: ModelConfig, pcfg: ParallelConfig, dims: ParallelDims, pp_rank: int
) -> tuple[int, int]:
    """(dense, expert) parameter elements a rank at `pp_rank` holds before FSDP: what data parallelism
    reduces over dp and over edp."""
    blocks, root = _stage_shards(probe, model_cfg, pcfg, dims, pp_rank)
    shards = [s for group in (*blocks, root) for s in group]
    return sum(prod(s.shape) for s in shards if not s.expert), sum(prod(s.shape) for s in shards if s.expert)


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param
