"""The per-rank training loop: one code path for every layout, one process included.

A step of global batch B sequences is cut into M micro-batches; micro-batch j's rows are split over the dp
ranks. Non-pipelined layouts run forward/backward per micro-batch and scale gradients by 1/M; pipelined ones
hand the same rows to the schedule (which also scales by 1/M). So the gradient is the mean over the
step's tokens in every layout, and the MoE balancing losses are counted once per layer and micro-batch. Under
a loss mask (chat data) it is the mean over the targets the mask counts in the whole global batch (`loss_scale`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from moeyard.moe.experts import choose_expert_path
from moeyard.moe.mtp import mtp_targets
from moeyard.parallel.config import shards_optimizer, uses_fsdp
from moeyard.parallel.data_parallel import finish_grads, gathered_through_step, sync_grads_now
from moeyard.parallel.dims import Axis, ParallelDims
from moeyard.parallel.grads import clip_grads, scale_grads
from moeyard.parallel.parallelize import attach_schedule, build_parallel_model, trace_expert_counts
from moeyard.parallel.pipeline import StageShapes, shared_embedding, sum_shared_embedding_grads
from moeyard.parallel.tensor import loss_context, reduce_tp_partial_grads
from moeyard.parallel.zero import ZeroAdamW
from moeyard.profiling.profiler import StepProfiler
from moeyard.profiling.sinks import MetricsLog
from moeyard.train.callbacks import Callback, Callbacks
from moeyard.train.checkpointing import Checkpointer, WeightLoader, checkpoint_meta, find_resume
from moeyard.train.collectives import CollectiveLog, apply_timeouts, recording
from moeyard.train.config import TrainerConfig, computes_in_bf16
from moeyard.train.data import IGNORE, Prefetcher, TokenData, build_data, to_device
from moeyard.train.guard import NonFiniteError, StepGuard
from moeyard.train.optim import adamw_options, build_optimizer, lr_at

DEFAULT_TIMEOUT_S = 1800


def pick_device(want: str) -> torch.device:
    """train.device: cuda, cpu, or auto (CUDA when available).

    A rank that sees one GPU uses it whatever its local rank: Slurm's --gpus-per-task (and a
    CUDA_VISIBLE_DEVICES per rank) leave each rank exactly its own GPU, as cuda:0. With several visible,
    the local rank picks.
    """
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        index = 0 if torch.cuda.device_count() == 1 else int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_s: int) -> int:
    """Joins the process group set up by the launcher's environment; returns the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds the NCCL communicator to this GPU at once, so each mesh axis's group is split
        # from it (ncclCommSplit) rather than bootstrapped again.
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device_id)
    return world


def read_to_host(t: torch.Tensor) -> list[float]:
    """The one device-to-host read of a logging step (every other step has none)."""
    return t.tolist()


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy in fp32 (logits may be vocab-sharded DTensors under loss_parallel): the mean over
    the targets; under a loss mask the sum over the targets that are not IGNORE, times `scale` (`loss_scale`)."""
    logits_NV, targets_N = logits.flatten(0, 1).float(), targets.flatten()
    if scale is None:
        return F.cross_entropy(logits_NV, targets_N)
    return F.cross_entropy(logits_NV, targets_N, reduction="sum", ignore_index=IGNORE) * scale


def loss_scale(targets_BS: torch.Tensor, micro_batches: int, dp: int) -> torch.Tensor | None:
    """Under a loss mask, what turns a micro-batch's summed loss into its share of the step's mean over the
    counted targets of the whole global batch `targets_BS` (on the host): M * dp / count.

    Every rank draws the same global batch, so each knows the count without a collective. The factor M * dp
    undoes the 1/M the gradients are scaled by and the mean over dp ranks they are reduced with (the logged and
    eval losses are averaged the same way), so every layout sums sum(counted losses) / count whatever share
    of the counted targets each micro-batch and rank holds. None when every target counts: then micro-batches
    are equal and today's mean per micro-batch is already the global mean.
    """
    counted = int((targets_BS != IGNORE).sum())
    if counted == targets_BS.numel():
        return None
    # A batch with no counted target (all prompt) trains nothing: its loss and gradients are 0.
    return torch.tensor(micro_batches * dp / max(counted, 1), dtype=torch.float32)


def mtp_scales(targets_BKS: torch.Tensor, micro_batches: int, dp: int) -> torch.Tensor:
    """Under model.mtp_layers, `loss_scale` for the main targets and each depth's (row k of the global batch's
    `mtp_targets` [B, 1 + D, S]): M * dp / count_k, so each depth's loss is its mean over the targets it
    counts in the whole global batch, in every layout (depth k counts fewer: sequence ends, documents)."""
    counted_K = (targets_BKS != IGNORE).sum(dim=(0, 2)).clamp(min=1)
    return (micro_batches * dp / counted_K).float()


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A detached plain tensor (loss_parallel returns replicated DTensor losses)."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


class Trainer:
    """Owns this rank's model parts, optimizer, data and metrics for one run."""

    def __init__(
        self,
        cfg: TrainerConfig,
        dims: ParallelDims | None = None,
        *,
        callbacks: Sequence[Callback] = (),
        collectives: CollectiveLog | None = None,
        timeout_s: int = DEFAULT_TIMEOUT_S,
        load_weights: WeightLoader | None = None,
    ) -> None:
        """`cfg` was validated by the launcher; `dims` defaults to the degrees it implies for this world.

        `callbacks` run after those named in train.callbacks; `collectives` is the run's collective log
        (named after the mesh axes here); `timeout_s` bounds rendezvous and collectives; `load_weights` reads
        a Hugging Face train.init_from (moeyard.interop.weights.loader_for).
        """
        self.cfg = cfg
        self.device = pick_device(cfg.train.device)
        world = init_distributed(self.device, timeout_s)
        self.dims = dims or ParallelDims.from_config(cfg.parallel, world)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.run_dir = Path(cfg.run.dir)
        self.callbacks = Callbacks([*Callbacks.from_config(cfg.train.callbacks).callbacks, *callbacks])
        self.step = 0
        self._scale: torch.Tensor | None = None  # the running batch's `loss_scale` (a loss mask), read by _lm_loss
        self._mtp_parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (LM, MTP) losses per micro-batch
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        # Resolved before the build: a resumed run allocates its shards and leaves them for the load to fill.
        resume = find_resume(cfg.train.resume, cfg.run.dir, self.rank, cfg.model, cfg.moe)
        self._build_model(init=resume is None)
        self.data: TokenData = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed, cfg.model.vocab_size)
        self.batches = Prefetcher(self._host_batch, self.device)
        self._build_services(collectives or CollectiveLog(), timeout_s)
        self.step = self.checkpointer.restore(resume, cfg.train.init_from, cfg.model, cfg.moe, load_weights)

    def _build_model(self, init: bool) -> None:
        """Meshes, this rank's model parts (and pipeline schedule), the optimizer."""
        cfg, t = self.cfg, self.cfg.train
        distributed = self.dims.is_distributed
        self.mesh = self.dims.build_mesh(self.device.type) if distributed else None
        self.expert_mesh = self.dims.build_expert_mesh(self.device.type) if distributed else None
        self.context_mesh = self.dims.build_context_mesh(self.device.type) if distributed else None
        self.micro_rows = t.batch_size // t.micro_batches // self.dims.dp
        # The mesh's dp axis holds dp x cp ranks, cp innermost: cp ranks share rows.
        self.dp_rank = self.mesh[Axis.DP.value].get_local_rank() // self.dims.cp if self.dims.dp_cp > 1 else 0
        self.tp_rank = self.mesh[Axis.TP.value].get_local_rank() if self.dims.tp > 1 else 0
        self.pm = build_parallel_model(
            cfg.model,
            cfg.moe,
            cfg.parallel,
            self.dims,
            self.mesh,
            self.expert_mesh,
            self.device,
            t.seed,
            self.bf16,
            init,
            context_mesh=self.context_mesh,
            seq_len=t.seq_len,
        )
        attach_schedule(self.pm, cfg.parallel, self.device, t.micro_batches, self._lm_loss, self._stage_shapes())
        experts = [moe.experts for moe in self.pm.moe_layers().values()]
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        line = choose_expert_path(experts, cfg.moe.grouped_mm, self.device, dtype)
        if line and self.rank == 0:
            print(f"moeyard: {line}", flush=True)
        if cfg.parallel.compile:  # the loop may have been chosen just now, for this device and dtype
            trace_expert_counts(self.pm.parts)
        if shards_optimizer(cfg.parallel.dp_mode, cfg.parallel.param_dtype):  # zero1, or bf16 params' masters
            zero1, options = cfg.parallel.dp_mode == "zero1", adamw_options(cfg.optim, self.device)
            self.optimizer = ZeroAdamW(self.pm, zero1, cfg.optim.weight_decay, **options)
        else:
            self.optimizer = build_optimizer(self.pm.named_parameters(), cfg.optim, self.device)

    def _build_services(self, collectives: CollectiveLog, timeout_s: int) -> None:
        """Metrics, profiling, the collective log and timeouts, the step guard and the checkpointer."""
        cfg, t, p = self.cfg, self.cfg.train, self.cfg.profiling
        self.log = MetricsLog(
            self.run_dir,
            is_writer=self.rank == 0,
            progress=p.progress,
            total_steps=t.steps,
            tensorboard=p.tensorboard,
            wandb=p if p.wandb else None,
            job_config=dataclasses.asdict(cfg) if p.wandb else None,
        )
        tokens_per_step = t.batch_size * t.seq_len
        self.prof = StepProfiler(
            p, cfg.model, cfg.moe, t.seq_len, tokens_per_step, self.pm, self.device, self.run_dir, self.log
        )
        self.collectives = collectives
        groups = vars(self.pm.groups)
        collectives.name_groups(groups)
        collectives.step = lambda: self.step + 1
        self.guard = StepGuard(t.nonfinite, self.rank, self.log, collectives, lambda: self.step + 1)
        self.checkpointer = Checkpointer(
            cfg.checkpoint.resolved(t.steps, t.init_from),
            cfg.run.dir,
            self.pm,
            self.optimizer,
            self.rank,
            self.callbacks,
            self._checkpoint_meta,
        )
        if dist.is_initialized():
            # launcher.timeout_s for the mesh's groups and the checkpoint writer's (torch's default is 30 min)
            apply_timeouts({**groups, "checkpoint": self.checkpointer.save_group}, timeout_s)

    def _stage_shapes(self) -> StageShapes:
        """What crosses pipeline stage boundaries, from the config (no forward on placeholder data)."""
        cfg = self.cfg
        # bf16 parameters (FSDP's gathered ones, or parallel.param_dtype=bf16) give a bf16 residual stream.
        fsdp = uses_fsdp(cfg.parallel.dp_mode, self.dims.dp_cp)
        fsdp_bf16 = self.bf16 and (fsdp or cfg.parallel.param_dtype == "bf16")
        return StageShapes(
            micro_rows=self.micro_rows,
            seq_len=cfg.train.seq_len // self.dims.cp,
            dim=cfg.model.dim,
            vocab_size=cfg.model.vocab_size,
            hidden_dtype=torch.bfloat16 if fsdp_bf16 else torch.float32,
            logits_dtype=torch.bfloat16 if self.bf16 else torch.float32,
            tp_mesh=self.mesh[Axis.TP.value] if self.dims.tp > 1 else None,
            sequence_parallel=cfg.parallel.sequence_parallel,
            mtp_layers=cfg.model.mtp_layers,
        )

    def _checkpoint_meta(self) -> dict:
        d, cfg = self.dims, self.cfg
        layout = {"pp": d.pp, "dp": d.dp, "tp": d.tp, "ep": d.ep, "dp_mode": cfg.parallel.dp_mode}
        layout.update({"cp": d.cp} if d.cp > 1 else {})  # named where used, as in the config error lines
        world = dist.get_world_size() if dist.is_initialized() else 1
        return checkpoint_meta(world, layout, cfg.model, cfg.moe, cfg.train.seed)

    @property
    def bf16(self) -> bool:
        """Whether this run computes under bf16 autocast (train.dtype, with auto settled by the device)."""
        return computes_in_bf16(self.cfg.train.dtype, self.device.type)

    def _autocast(self):
        """bf16 autocast on the training device (CPU too: it supports bf16, and tests run the bf16 path)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def local_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This dp rank's rows of a global batch, micro-batch after micro-batch [M * micro_rows, S], on the
        device."""
        return to_device(self._own_rows(x), self.device)

    def _own_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This dp rank's rows of a global batch [M * micro_rows, S], where `x` is (on the host)."""
        m, r = self.cfg.train.micro_batches, self.micro_rows
        # contiguous: with one row per micro-batch the reshape is a strided view, whose micro-batches torch
        # 2.11's pipeline stage refuses ("stride mismatch") against the contiguous shapes it was declared.
        return x.view(m, self.dims.dp, r, -1)[:, self.dp_rank].reshape(m * r, -1).contiguous()

    def context_split(self, x_BS: torch.Tensor) -> torch.Tensor:
        """This rank's positions of rows [B, S] under context parallelism (parallel/context.py), else the rows."""
        shard = self.pm.parts[0].context
        return shard.split(x_BS) if shard is not None else x_BS

    def _host_batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """This rank's inputs and targets of step's global batch, on the host (cut before the copy), and under
        a loss mask the step's `loss_scale`."""
        x, y = self.data.batch(step, self.cfg.train.batch_size)
        if self.cfg.model.mtp_layers:  # every depth's targets, [B, (1 + D) * S], and their scales
            y = mtp_targets(y, self.cfg.model.mtp_layers, self.data.documents(x), IGNORE)
            scale = mtp_scales(y, self.cfg.train.micro_batches, self.dims.dp_cp)
            y = y.flatten(1)
        else:
            scale = loss_scale(y, self.cfg.train.micro_batches, self.dims.dp_cp)
        rows = (self._own_rows(x), self._own_rows(y))
        return rows if scale is None else (*rows, scale)

    def _lm_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """`lm_loss` with the running batch's scale: the loss every layout's micro-batches (and the pipeline
        schedule, which holds this function from the start) compute."""
        if not self.cfg.model.mtp_layers:
            return lm_loss(logits, targets, self._scale)
        S = logits.shape[1] // (1 + self.cfg.model.mtp_layers)
        if targets.shape[1] == S:  # evaluation hands the main targets only: the LM loss
            return lm_loss(logits[:, :S], targets, self._scale)
        return self._mtp_loss(logits, targets, S)

    def _mtp_loss(self, logits: torch.Tensor, targets: torch.Tensor, S: int) -> torch.Tensor:
        """The training loss under model.mtp_layers: LM loss + lambda / D * sum_k CE_k (DeepSeek-V3, eq. 25),
        each term a mean over its depth's counted targets (`mtp_scales`); logits [B, (1 + D) * S, V], targets
        [B, (1 + D) * S] (`mtp_targets`, flattened)."""
        K = 1 + self.cfg.model.mtp_layers
        parts = [
            lm_loss(logits[:, k * S : (k + 1) * S], targets[:, k * S : (k + 1) * S], self._scale[k]) for k in range(K)
        ]
        main, mtp = parts[0], torch.stack(parts[1:]).mean()
        self._mtp_parts.append((_plain(main), _plain(mtp)))
        return main + self.cfg.train.mtp_loss_coef * mtp

    def forward_backward(
        self, x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Accumulates the gradient of the step's mean loss; returns the per-micro-batch LM losses (`scale`:
        the batch's `loss_scale` under a loss mask)."""
        m = self.cfg.train.micro_batches
        self._scale = scale
        self._mtp_parts = []
        losses: list[torch.Tensor] = []
        doc = self.data.documents(x)  # data.document_mask: the whole rows' document ids [M * rows, S], else None
        x, y = self.context_split(x), self.context_split(y)
        with loss_context(self.dims.tp), self._autocast():
            if self.pm.schedule is not None:
                args = (x,) if self.pm.has_first_stage else ()
                target = y if self.pm.has_last_stage else None
                # No outputs back: torch would keep every micro-batch's logits until the step ends; the
                # losses come from the loss function, in `losses`.
                with self.prof.phase("forward_backward"):  # [profiling] a schedule interleaves the two
                    kwargs = self._stage_kwargs(x, doc)
                    hold = self.cfg.parallel.fsdp_hold == "step" and self.cfg.parallel.dp_mode == "fsdp"  # zero2 holds
                    with gathered_through_step(self.pm.parts, hold):
                        self.pm.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
                return self._lm_losses([_plain(loss) for loss in losses])
            model = self.pm.parts[0]
            docs = doc.chunk(m) if doc is not None else [None] * m
            for i, (xm, ym, dm) in enumerate(zip(x.chunk(m), y.chunk(m), docs, strict=True)):
                zero2, last = self.cfg.parallel.dp_mode == "zero2", i == m - 1
                sync_grads_now(model, last or zero2 or self.cfg.parallel.fsdp_hold == "micro_batch", zero2 and not last)
                with self.prof.phase("forward"):  # [profiling]
                    loss = self._lm_loss(model(xm, doc_ids=dm, **self._mtp_kwargs(xm)), ym)
                with self.prof.phase("backward"):  # [profiling]
                    loss.backward()
                losses.append(_plain(loss))
        scale_grads([p for _, p in self.pm.named_parameters()], 1.0 / m)
        return self._lm_losses(losses)

    def _lm_losses(self, losses: list[torch.Tensor]) -> list[torch.Tensor]:
        """The LM part of each micro-batch's loss (under model.mtp_layers the loss adds the MTP term)."""
        return [main for main, _ in self._mtp_parts] if self.cfg.model.mtp_layers else losses

    def train_step(self, log: bool = True) -> dict[str, float]:
        """One optimizer step. Only a logging step (`log`) reads values back to the host: every other step
        queues its work on the device without waiting for it (no .item(), .tolist() or .cpu())."""
        cfg, step = self.cfg, self.step
        self.prof.step_begin(step)  # [profiling] breakdown on sampled steps, NVTX ranges on CUDA
        with self.prof.phase("data"):  # [profiling]
            x, y, *scale = self.batches.get(step)  # copied while the previous step ran (Prefetcher)
        lr = lr_at(step, cfg.optim, cfg.train.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = self.forward_backward(x, y, *scale)
        g = self.pm.groups
        with self.prof.phase("grad_sync"):  # [profiling]
            # cp ranks average gradients as dp ranks do (the mesh's dp axis holds dp x cp ranks).
            dp_mode = "fsdp" if uses_fsdp(cfg.parallel.dp_mode, self.dims.dp_cp) else "replicate"  # zero1: replicated
            finish_grads(self.pm.parts, dp_mode, g.dp, g.edp, self.dims.dp_cp, self.dims.edp)
            reduce_tp_partial_grads(self.pm.named_parameters(), g.tp)  # MoE router, shared experts
            sum_shared_embedding_grads(self.pm.parts, self.pm.stage_ids, self.pm.n_stages, g.embedding)  # MTP
        with self.prof.phase("optimizer"):  # [profiling]
            counted, copy = shared_embedding(self.pm.named_parameters(), self.pm.has_first_stage)
            grad_norm = clip_grads(counted, cfg.optim.grad_clip, g.ep, g.pp, also_scale=copy)
            updated = self.guard.allow_update(grad_norm, self.optimizer)  # [guard] NaN/Inf: skip or halt
            if updated:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if step + 1 < cfg.train.steps:
            self.batches.prefetch(step + 1)  # step's work is queued: the next batch travels while it runs
        layer_stats = {lid: moe.drain_stats() for lid, moe in self.pm.moe_layers().items()}
        # One forward per micro-batch and layer: pipeline stages declare their shapes instead of running one
        # on placeholder data, and recomputation under activation checkpointing records nothing.
        assert all(len(s) == cfg.train.micro_batches for s in layer_stats.values()), "unexpected forwards"
        if updated:
            self._update_bias(layer_stats, self.guard.update_ok())
        metrics: dict[str, float] = {"step": step + 1, "lr": lr}
        if log:
            self._logged_metrics(metrics, losses, grad_norm, layer_stats)
        self.prof.step_end(metrics, layer_stats, log)  # [profiling] breakdown, throughput, MFU
        self.step += 1
        return metrics

    def _update_bias(self, layer_stats: dict[str, list[dict[str, torch.Tensor]]], ok: torch.Tensor | None) -> None:
        """Aux-loss-free balancing: the step's routed counts, summed over the batch's ranks in one all-reduce
        for every layer, steer each bias (`ok` = 0: the device skipped the step, the bias stays)."""
        if self.cfg.moe.bias_update_rate <= 0 or not layer_stats:
            return
        layers = self.pm.moe_layers()
        load_LE = torch.stack([torch.stack([s["routed"] for s in layer_stats[lid]]).sum(0) for lid in layers])
        if self.pm.groups.batch is not None:
            dist.all_reduce(load_LE, group=self.pm.groups.batch)
        for moe, load_E in zip(layers.values(), load_LE, strict=True):
            moe.router.update_bias(load_E, ok)

    def _logged_metrics(
        self, metrics: dict, losses: list[torch.Tensor], grad_norm: torch.Tensor, layer_stats: dict
    ) -> None:
        """A logging step's figures: losses, balancing terms, drops, guard flags, peak memory and expert load
        travel in one packed all-reduce and come back to the host in one read."""
        parts = [self._pack_losses(losses, layer_stats), grad_norm.detach().double().reshape(1)]
        parts += [self.guard.pack(self.device), self.prof.pack(layer_stats), self._pack_mtp()]
        vec = torch.cat([t.to(self.device, torch.float64) for t in parts])
        if dist.is_initialized():
            dist.all_reduce(vec)
        values = read_to_host(vec)
        if self.cfg.model.mtp_layers:  # (1/D) sum_k CE_k, the mean over the depths (without lambda)
            metrics["mtp_loss"] = values.pop() / self.dims.dp_cp
        world = dist.get_world_size() if dist.is_initialized() else 1
        lm_sum, aux_sum, seq_sum, z_sum, routed, kept, norm_sum, bad, stop = values[:9]
        n = self.dims.dp_cp * self.dims.tp
        metrics.update(loss=lm_sum / self.dims.dp_cp, aux_loss=aux_sum / n, seq_aux_loss=seq_sum / n)
        metrics.update(z_loss=z_sum / n, dropped_frac=1.0 - kept / routed if routed else 0.0)
        metrics["grad_norm"] = norm_sum / world  # identical on every rank
        self.guard.unpack([bad, stop], metrics["grad_norm"], metrics["loss"])
        metrics.update(self.guard.metrics())  # [guard] marks a non-finite step
        self.prof.unpack(metrics, values[9:])  # [profiling] peak memory, expert load
        # data.blend: tokens each source gave so far, known on the host without communication (train/blend.py)
        metrics.update(self.data.source_tokens(int(metrics["step"]), self.cfg.train.batch_size))

    def _pack_losses(self, losses: list[torch.Tensor], layer_stats: dict) -> torch.Tensor:
        """This rank's [LM loss, aux, seq-aux, z (per-layer means summed), routed, kept] on the device.

        LM loss: counted on tp rank 0 only (tp ranks hold the same value). Balancing terms: each rank's are
        estimates over its own tokens (tp ranks route different slices of the sequences), so the caller
        takes their mean over the dp x tp ranks, summed over layers and stages.
        """
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        stats = [s for per_layer in layer_stats.values() for s in per_layer]
        lm = torch.stack(losses).double().mean() if losses and self.tp_rank == 0 else zero
        return torch.stack(
            [
                lm.to(self.device),
                *(self._layer_mean(layer_stats, name, zero) for name in ("aux_loss", "seq_aux_loss", "z_loss")),
                sum((s["routed"].sum().double() for s in stats), zero),
                sum((s["kept"].sum().double() for s in stats), zero),
            ]
        )

    def _pack_mtp(self) -> torch.Tensor:
        """Under model.mtp_layers, this rank's MTP loss ([1], counted on tp rank 0 of the last stage, the
        mean over micro-batches); else nothing ([0])."""
        if not self.cfg.model.mtp_layers:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        held = self._mtp_parts and self.tp_rank == 0
        mtp = torch.stack([m for _, m in self._mtp_parts]).double().mean() if held else torch.zeros(())
        return mtp.to(self.device, torch.float64).reshape(1)

    @staticmethod
    def _layer_mean(layer_stats: dict, name: str, zero: torch.Tensor) -> torch.Tensor:
        """`name` averaged over each layer's micro-batches, summed over layers."""
        means = (torch.stack([s[name] for s in per_layer]).double().mean() for per_layer in layer_stats.values())
        return sum(means, zero)

    def _stage_kwargs(self, x: torch.Tensor, doc: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """What every pipeline stage's forward takes besides its input: the document ids under
        data.document_mask, and under model.mtp_layers the token ids (the last stage's MTP modules embed
        them). Every pp rank loads the batch's tokens, so each stage derives the ids of its own micro-batch
        (the schedule splits them with the inputs); no stage sends them to the next. `doc`: the whole rows'
        document ids (`data.documents` before `context_split`)."""
        kwargs = {"doc_ids": doc} if doc is not None else {}
        return {**kwargs, **self._mtp_kwargs(x)}

    def _mtp_kwargs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Under model.mtp_layers, the token ids that ask the model for the MTP logits too (`Transformer.forward`)."""
        return {"mtp_tokens": x} if self.cfg.model.mtp_layers else {}

    def _eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This rank's mean LM loss over one held-out batch (zero on ranks without the last stage)."""
        m = self.cfg.train.micro_batches
        doc = self.data.documents(x)  # data.document_mask: the whole rows' document ids, else None
        x, y = self.context_split(x), self.context_split(y)
        with loss_context(self.dims.tp), self._autocast():
            if self.pm.schedule is None:
                model = self.pm.parts[0]
                docs = doc.chunk(m) if doc is not None else [None] * m
                chunks = zip(x.chunk(m), y.chunk(m), docs, strict=True)
                losses = [self._lm_loss(model(xm, doc_ids=dm, **self._mtp_kwargs(xm)), ym) for xm, ym, dm in chunks]
            else:
                losses = []
                first, last = self.pm.has_first_stage, self.pm.has_last_stage
                args, target = (x,) if first else (), y if last else None
                # As in training: the losses come from the loss function, one per micro-batch; with outputs
                # asked for, torch would also keep every micro-batch's logits and concatenate them whole.
                kwargs = self._stage_kwargs(x, doc)
                self.pm.schedule.eval(*args, target=target, losses=losses, return_outputs=False, **kwargs)
        if not losses:
            return torch.zeros((), dtype=torch.float64)
        return torch.stack([_plain(v) for v in losses]).double().mean().cpu()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over train.eval_batches fixed held-out batches."""
        self.pm.train(False)
        t = self.cfg.train
        total = torch.zeros((), dtype=torch.float64)
        for i in range(t.eval_batches):
            x, y = self.data.eval_batch(i, t.batch_size)
            scale = loss_scale(y, t.micro_batches, self.dims.dp_cp)  # a loss mask: as in training
            self._scale = None if scale is None else to_device(scale, self.device)
            x, y = self.local_rows(x), self.local_rows(y)
            loss = self._eval_loss(x, y)
            if self.tp_rank == 0:
                total += loss
        for moe in self.pm.moe_layers().values():
            moe.drain_stats()
        self.pm.train(True)
        if dist.is_initialized():
            total = total.to(self.device)
            dist.all_reduce(total)
            total = total.cpu() / self.dims.dp_cp
        return float(total) / t.eval_batches

    def fit(self) -> list[dict[str, float]]:
        """Trains cfg.train.steps steps; returns the logged metrics."""
        t = self.cfg.train
        history = []
        while self.step < t.steps:
            last = self.step + 1 == t.steps
            metrics = self.train_step(log=(self.step + 1) % t.log_every == 0 or last)
            if t.eval_every and (self.step % t.eval_every == 0 or last):
                metrics["eval_loss"] = self.evaluate()
            if "loss" in metrics:
                self.prof.write(metrics)  # [profiling] rank 0 writes the sinks
            history.append(metrics)
            self.checkpointer.after_step(self, self.step, last or self.guard.stop_requested)  # [checkpoint]
            self.callbacks.on_step_end(self, self.step, metrics)
            if self.guard.stop_requested:  # [guard] SIGTERM: this step is saved, stop here
                break
        self.prof.close()  # [profiling] traces, expert_load.jsonl, sinks
        self.guard.close()
        return history


def train(
    cfg: TrainerConfig, timeout_s: int = DEFAULT_TIMEOUT_S, load_weights: WeightLoader | None = None
) -> list[dict[str, float]]:
    """Entry point on every rank: trains, then leaves the process group (exit 143 after a SIGTERM stop)."""
    collectives = CollectiveLog()  # this run's; on an error every rank prints it (no barrier: peers may be gone)
    trainer = None
    with recording(collectives, quiet=(NonFiniteError, ValueError)):
        try:
            trainer = Trainer(cfg, collectives=collectives, timeout_s=timeout_s, load_weights=load_weights)
            history = trainer.fit()
        except BaseException as err:
            if trainer is not None and not isinstance(err, SystemExit):
                trainer.callbacks.on_error(trainer, err)
            raise
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    trainer.guard.exit_if_stopped()  # [guard] after a SIGTERM (checkpoint saved): exit 143
    return history
