"""`moeyard generate SOURCE --prompt TEXT parallel.*=... launcher.*=...`: the ranks' side.

Every rank builds its shards of the model in the given layout (the same `build_parallel_model` as training)
and fills them from the checkpoint through DCP, which reshards whatever layout saved it, or from the Hugging
Face safetensors, each rank reading only its slices. Each new token then runs one sharded forward over the
whole prefix (no KV cache, as in one process: interop/generate.py): tensor-parallel ranks gather the last
position's vocab-sharded logits, and with pipeline stages the last stage sends them to the first. Rank 0
picks the token with the seeded generator of the one-process loop (`sample_loop`) and broadcasts it, so every
rank feeds the same sequence to its next forward and a layout samples what one process samples.

Under tensor parallelism MoE layers (and sequence parallelism every block) split each sequence into tp equal
slices, so a prefix is padded at its end to a multiple of tp. Causal attention keeps the padding out of every
earlier position, and dropless token-choice routing is per token: the real positions' logits are those of
the unpadded prefix. Routing that depends on the sequence's length (a capacity, expert choice) would not be,
so the command refuses it before any rank starts (`padding_rule`).

The command writes a `Request` (JSON) and names it in MOEYARD_GENERATE; rank 0 writes the new tokens and the
layout the ranks ran to `Request.result`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from moeyard.interop.generate import Sampling, sample_loop
from moeyard.interop.hf import load_hf_weights
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.moe.experts import choose_expert_path
from moeyard.parallel import checkpoint as ckpt
from moeyard.parallel.config import ParallelConfig
from moeyard.parallel.dims import Axis, ParallelDims
from moeyard.parallel.parallelize import ParallelModel, build_parallel_model
from moeyard.parallel.pipeline import StageShapes, build_schedule
from moeyard.train.config import TrainerConfig
from moeyard.train.trainer import init_distributed, pick_device

FIELD = "generate"


@dataclass(frozen=True, kw_only=True)
class Request:
    """What every rank generates: the weights, the prompt's ids and how to sample."""

    checkpoint: str | None = None
    """A complete step_N directory (the command resolved and verified it), or None with `hf_dir`."""
    hf_dir: str | None = None
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    eos_id: int | None
    result: str
    """Where rank 0 writes {"tokens": [...], "layout": `layout_of(...)`}."""

    def write(self, path: Path) -> None:
        path.write_text(json.dumps({**asdict(self), "sampling": asdict(self.sampling)}))

    @classmethod
    def read(cls, path: Path) -> Request:
        raw = json.loads(path.read_text())
        return cls(**{**raw, "sampling": Sampling(**raw["sampling"])})


def pad_multiple(m: ModelConfig, p: ParallelConfig) -> int:
    """What a sequence's length must be a multiple of: tp where tp ranks split sequences (MoE layers, or every
    block under sequence parallelism), else 1."""
    splits = p.sequence_parallel or m.n_layers > m.first_dense_layers
    return p.tp if p.tp > 1 and splits else 1


def padded(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def padding_rule(e: MoEConfig, p: ParallelConfig) -> str | None:
    """Why this layout cannot pad sequences without changing the real positions' logits, or None."""
    if p.tp == 1:
        return None
    if e.capacity_factor is not None:
        return (
            f"parallel.tp={p.tp} with moe.capacity_factor={e.capacity_factor}: generation pads each prefix to a "
            "multiple of tp, which changes a sequence's expert capacity (rule: parallel.tp=1, or a dropless model)"
        )
    if e.router == "expert_choice":
        return (
            f"parallel.tp={p.tp} with moe.router=expert_choice: generation pads each prefix to a multiple of tp, "
            "and experts would choose among the padding (rule: parallel.tp=1 for an expert-choice model)"
        )
    return None


class ShardedForward:
    """ids -> the last position's logits [V] (fp32) on rank 0, None on every other rank; a collective."""

    def __init__(self, pm: ParallelModel, cfg: TrainerConfig, device: torch.device) -> None:
        self.pm, self.cfg, self.device = pm, cfg, device
        self.multiple = pad_multiple(cfg.model, cfg.parallel)
        self.tp_mesh = pm.mesh[Axis.TP.value] if pm.dims.tp > 1 else None

    def __call__(self, ids: list[int]) -> torch.Tensor | None:
        n = len(ids)
        # Any id pads: causal attention keeps the tail out of positions < n (module doc).
        x_1S = torch.tensor([ids + [ids[-1]] * (padded(n, self.multiple) - n)], dtype=torch.int64, device=self.device)
        logits = self._logits(x_1S)
        for moe in self.pm.moe_layers().values():
            moe.drain_stats()  # routing statistics are the trainer's; nothing here reads them
        last_V = None if logits is None else self._whole_row(logits, n - 1)
        if self.pm.dims.pp > 1:
            last_V = self._from_last_stage(last_V)
        return last_V if dist.get_rank() == 0 else None

    def _logits(self, x_1S: torch.Tensor) -> torch.Tensor | None:
        """[1, S, V] logits (vocab-sharded under tp) where this rank holds the last stage, else None."""
        if self.pm.dims.pp == 1:
            return self.pm.parts[0](x_1S)
        schedule = self._schedule(x_1S.shape[1])
        args = (x_1S,) if self.pm.has_first_stage else ()
        return schedule.eval(*args, return_outputs=self.pm.has_last_stage)

    def _schedule(self, seq_len: int):
        """A one-micro-batch GPipe schedule for sequences of `seq_len`: stages declare the shapes they pass on
        (`StageShapes`, no placeholder forward), and the length grows every token, so each forward gets its own.
        GPipe whatever parallel.pp_schedule says: with one micro-batch and no backward, every schedule is this."""
        m = self.cfg.model
        shapes = StageShapes(
            micro_rows=1,
            seq_len=seq_len,
            dim=m.dim,
            vocab_size=m.vocab_size,
            hidden_dtype=torch.float32,
            tp_mesh=self.tp_mesh,
            sequence_parallel=self.cfg.parallel.sequence_parallel,
        )
        pm, pp_mesh = self.pm, self.pm.mesh[Axis.PP.value]
        # Declared as training declares them (floating tensors requiring gradients), which the stage checks
        # its declared gradients against; under no_grad a DTensor would be made without.
        with torch.enable_grad():
            return build_schedule(pm.parts, pm.stage_ids, pm.n_stages, pp_mesh, self.device, "gpipe", 1, None, shapes)

    def _whole_row(self, logits_1SV: torch.Tensor, position: int) -> torch.Tensor:
        """Row `position` of the logits, whole [V] in fp32: tp ranks gather their vocab slices of that row only."""
        if not isinstance(logits_1SV, DTensor):
            return logits_1SV[0, position].float()
        local_v = logits_1SV.to_local()[0, position].float().contiguous()
        pieces = [torch.empty_like(local_v) for _ in range(self.tp_mesh.size())]
        dist.all_gather(pieces, local_v, group=self.tp_mesh.get_group())
        return torch.cat(pieces)

    def _from_last_stage(self, last_V: torch.Tensor | None) -> torch.Tensor:
        """The last stage's row, sent to every stage of this pipeline (rank 0 is a first stage)."""
        row_V = last_V if last_V is not None else torch.empty(self.cfg.model.vocab_size, device=self.device)
        group = self.pm.mesh[Axis.PP.value].get_group()
        dist.broadcast(row_V, group_src=self.pm.dims.pp - 1, group=group)
        return row_V


def layout_of(dims: ParallelDims) -> dict[str, int]:
    """The layout the ranks ran, as `moeyard generate --json` reports it."""
    return {"world_size": dims.world_size, "pp": dims.pp, "dp": dims.dp, "tp": dims.tp, "ep": dims.ep}


def load_model(cfg: TrainerConfig, request: Request, device: torch.device) -> ParallelModel:
    """This rank's shards of the model in cfg.parallel's layout, filled from the request's weights."""
    dims = ParallelDims.from_config(cfg.parallel, dist.get_world_size())
    mesh, expert_mesh = dims.build_mesh(device.type), dims.build_expert_mesh(device.type)
    pm = build_parallel_model(
        cfg.model, cfg.moe, cfg.parallel, dims, mesh, expert_mesh, device, seed=0, bf16=False, init=False
    )
    # The expert path one-process generation picks (interop.generate.one_process_model), in fp32.
    choose_expert_path([moe.experts for moe in pm.moe_layers().values()], "auto", device, torch.float32)
    pm.train(False)
    if request.checkpoint is not None:
        path = Path(request.checkpoint)
        ckpt.load(pm, None, path, ckpt.read_meta(path, FIELD), FIELD, weights_only=True)
    else:
        load_hf_weights(pm, Path(request.hf_dir), cfg.model)
    return pm


def generate_on_ranks(cfg: TrainerConfig, request_path: Path, timeout_s: int) -> None:
    """Every rank's part of a sharded generation; rank 0 writes the tokens. Leaves the process group."""
    request = Request.read(request_path)
    device = pick_device(cfg.train.device)
    init_distributed(device, timeout_s)
    pm = load_model(cfg, request, device)
    forward = ShardedForward(pm, cfg, device)

    def agree(token: int | None) -> int:
        t = torch.tensor([-1 if token is None else token], dtype=torch.int64, device=device)
        dist.broadcast(t, src=0)
        return int(t)

    with torch.no_grad():
        new = sample_loop(forward, request.prompt_ids, request.max_new_tokens, request.sampling, request.eos_id, agree)
    if dist.get_rank() == 0:
        result = Path(request.result)
        tmp = result.with_suffix(".tmp")
        tmp.write_text(json.dumps({"tokens": new, "layout": layout_of(pm.dims)}))
        tmp.replace(result)
    dist.barrier()
    dist.destroy_process_group()
