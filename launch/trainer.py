"""The per-rank training loop: one code path for every layout, one process included.

A step of global batch B sequences is cut into M micro-batches; micro-batch j's rows are split over the dp
ranks. Non-pipelined layouts run forward/backward per micro-batch and scale gradients by 1/M; pipelined ones
hand the same rows to the schedule (which also scales by 1/M). So the gradient is the mean over the
step's tokens in every layout, and the MoE balancing losses are counted once per layer and micro-batch.
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from launch.checkpointing import Checkpointer
from launch.config import JobConfig
from launch.data import TokenData, build_data
from launch.faults import StepGuard, report_collectives_on_error
from launch.validate import validate
from parallel.data_parallel import finish_grads
from parallel.dims import Axis, ParallelDims
from parallel.grads import clip_grads, scale_grads
from parallel.parallelize import ParallelModel, attach_schedule, build_parallel_model
from parallel.tensor import loss_context
from profiling.profiler import StepProfiler
from profiling.sinks import MetricsLog


def pick_device(cfg: JobConfig) -> torch.device:
    want = cfg.train.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(cfg: JobConfig, device: torch.device) -> int:
    """Joins the process group set up by the launcher's environment; returns the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.launcher.timeout_s))
    return world


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32 (logits may be vocab-sharded DTensors under loss_parallel)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A detached plain tensor (loss_parallel returns replicated DTensor losses)."""
    t = t.detach()
    return t.full_tensor() if isinstance(t, DTensor) else t


def lr_at(step: int, cfg: JobConfig) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.lr * min_lr_ratio at train.steps."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def build_optimizer(pm: ParallelModel, cfg: JobConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms) do not; fused kernel on CUDA (apex's FusedAdam equivalent).

    DTensor and plain parameters go to separate groups: the multi-tensor kernels cannot mix them.
    """
    o = cfg.optim
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for _, p in pm.named_parameters():
        groups.setdefault((p.ndim >= 2, isinstance(p, DTensor)), []).append(p)
    fused = o.fused == "on" or (o.fused == "auto" and device.type == "cuda")
    param_groups = [
        {"params": params, "weight_decay": o.weight_decay if decay else 0.0}
        for (decay, _), params in sorted(groups.items())
    ]
    return torch.optim.AdamW(
        param_groups,
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )


class Trainer:
    """Owns this rank's model parts, optimizer, data and metrics for one run."""

    def __init__(self, cfg: JobConfig, dims: ParallelDims | None = None) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg)
        world = init_distributed(cfg, self.device)
        self.dims = dims or validate(cfg, world)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.run_dir = Path(cfg.run.dir)
        torch.manual_seed(cfg.train.seed)
        if cfg.train.deterministic and self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        self.mesh = self.dims.build_mesh(self.device.type) if self.dims.is_distributed else None
        t = cfg.train
        self.micro_rows = t.batch_size // t.micro_batches // self.dims.dp
        self.pm = build_parallel_model(
            cfg.model, cfg.moe, cfg.parallel, self.dims, self.mesh, self.device, t.seed, bf16=self.bf16
        )
        attach_schedule(self.pm, cfg.parallel, self.device, t.micro_batches, lm_loss)
        self.optimizer = build_optimizer(self.pm, cfg, self.device)
        self.data: TokenData = build_data(
            cfg.data.source,
            cfg.data.path,
            cfg.data.max_files,
            cfg.data.val_fraction,
            t.seq_len,
            t.seed,
            cfg.model.vocab_size,
        )
        self.dp_rank = self.mesh[Axis.DP.value].get_local_rank() if self.dims.dp > 1 else 0
        self.tp_rank = self.mesh[Axis.TP.value].get_local_rank() if self.dims.tp > 1 else 0
        self.log = MetricsLog(
            self.run_dir,
            is_writer=self.rank == 0,
            progress=cfg.profiling.progress,
            total_steps=t.steps,
            tensorboard=cfg.profiling.tensorboard,
        )
        self.prof = StepProfiler(cfg, self.pm, self.device, self.run_dir, self.log)  # [profiling]
        self.step = 0
        self.guard = StepGuard(self)  # [faults] SIGTERM, NaN/Inf policy, collective log, test fault hook
        self.checkpointer = Checkpointer(self)  # [checkpoint] train.resume / train.init_from, periodic saves
        self.step = self.checkpointer.restore()

    @property
    def bf16(self) -> bool:
        return self.cfg.train.dtype == "bf16" and self.device.type == "cuda"

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16)

    def local_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This dp rank's rows of a global batch, micro-batch after micro-batch [M * micro_rows, S]."""
        m, r = self.cfg.train.micro_batches, self.micro_rows
        per_micro = x.view(m, self.dims.dp, r, -1)[:, self.dp_rank]
        return per_micro.reshape(m * r, -1).to(self.device)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Accumulates the gradient of the step's mean loss; returns the per-micro-batch LM losses."""
        m = self.cfg.train.micro_batches
        losses: list[torch.Tensor] = []
        with loss_context(self.dims.tp), self._autocast():
            if self.pm.schedule is not None:
                args = (x,) if self.pm.has_first_stage else ()
                target = y if self.pm.has_last_stage else None
                with self.prof.phase("forward_backward"):  # [profiling] a schedule interleaves the two
                    self.pm.schedule.step(*args, target=target, losses=losses)
                return [_plain(loss) for loss in losses]
            model = self.pm.parts[0]
            for xm, ym in zip(x.chunk(m), y.chunk(m), strict=True):
                with self.prof.phase("forward"):  # [profiling]
                    loss = lm_loss(model(xm), ym)
                with self.prof.phase("backward"):  # [profiling]
                    loss.backward()
                losses.append(_plain(loss))
        scale_grads([p for _, p in self.pm.named_parameters()], 1.0 / m)
        return losses

    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        self.prof.step_begin(step)  # [profiling] breakdown on sampled steps, NVTX ranges on CUDA
        t0 = time.perf_counter()
        with self.prof.phase("data"):  # [profiling]
            x, y = self.data.batch(step, cfg.train.batch_size)
            x, y = self.local_rows(x), self.local_rows(y)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        losses = self.forward_backward(x, y)
        g = self.pm.groups
        with self.prof.phase("grad_sync"):  # [profiling]
            finish_grads(self.pm.parts, cfg.parallel.dp_mode, g.dp, g.edp, self.dims.dp, self.dims.ep)
        with self.prof.phase("optimizer"):  # [profiling]
            grad_norm = clip_grads(self.pm.named_parameters(), cfg.optim.grad_clip, g.ep, g.pp)
            skip = self.guard.skip_step(losses, grad_norm)  # [faults] NaN/Inf: skip or halt; agree on SIGTERM
            if not skip:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        # The last M forwards are the step's micro-batches; a pipeline stage's first step also runs a
        # metadata-inference forward (on placeholder data) whose statistics are dropped here.
        m = cfg.train.micro_batches
        layer_stats = {lid: moe.drain_stats()[-m:] for lid, moe in self.pm.moe_layers().items()}
        if not skip:
            self._update_bias(layer_stats)
        metrics = self._reduce_losses(losses, layer_stats)
        metrics.update(self.guard.metrics())  # [faults] marks a non-finite step
        elapsed = time.perf_counter() - t0
        metrics.update(
            step=step + 1,
            lr=lr,
            grad_norm=float(grad_norm),
            step_time_s=elapsed,
            tokens_per_s=cfg.train.batch_size * cfg.train.seq_len / elapsed,
        )
        self.prof.step_end(metrics, layer_stats)  # [profiling] breakdown, throughput, MFU; keeps the load
        self.step += 1
        return metrics

    def _update_bias(self, layer_stats: dict[str, list[dict[str, torch.Tensor]]]) -> None:
        """Aux-loss-free balancing: the step's routed counts, summed over data ranks, steer each bias."""
        if self.cfg.moe.bias_update_rate <= 0:
            return
        for lid, moe in self.pm.moe_layers().items():
            load_E = torch.stack([s["routed"] for s in layer_stats[lid]]).sum(0)
            if self.pm.groups.dp is not None:
                dist.all_reduce(load_E, group=self.pm.groups.dp)
            moe.router.update_bias(load_E)

    def _reduce_losses(self, losses: list[torch.Tensor], layer_stats: dict) -> dict[str, float]:
        """Step means over micro-batches and dp ranks; aux terms summed over layers (and stages)."""
        names = ("loss", "aux_loss", "seq_aux_loss", "z_loss")
        vec = torch.zeros(len(names), dtype=torch.float64)
        if self.tp_rank == 0:
            if losses:
                vec[0] = torch.stack(losses).double().mean()
            for stats in layer_stats.values():
                for i, name in enumerate(names[1:], start=1):
                    vec[i] += torch.stack([s[name] for s in stats]).double().mean()
        if dist.is_initialized():
            vec = vec.to(self.device)
            dist.all_reduce(vec)
            vec = vec.cpu() / self.dims.dp
        return dict(zip(names, vec.tolist(), strict=True))

    def _eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This rank's mean LM loss over one held-out batch (zero on ranks without the last stage)."""
        m = self.cfg.train.micro_batches
        with loss_context(self.dims.tp), self._autocast():
            if self.pm.schedule is None:
                model = self.pm.parts[0]
                losses = [lm_loss(model(xm), ym) for xm, ym in zip(x.chunk(m), y.chunk(m), strict=True)]
            else:
                losses = []
                first, last = self.pm.has_first_stage, self.pm.has_last_stage
                self.pm.schedule.eval(*((x,) if first else ()), target=y if last else None, losses=losses)
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
            x, y = (self.local_rows(v) for v in self.data.eval_batch(i, t.batch_size))
            loss = self._eval_loss(x, y)
            if self.tp_rank == 0:
                total += loss
        for moe in self.pm.moe_layers().values():
            moe.drain_stats()
        self.pm.train(True)
        if dist.is_initialized():
            total = total.to(self.device)
            dist.all_reduce(total)
            total = total.cpu() / self.dims.dp
        return float(total) / t.eval_batches

    def fit(self) -> list[dict[str, float]]:
        """Trains cfg.train.steps steps; returns the logged metrics."""
        t = self.cfg.train
        history = []
        while self.step < t.steps:
            metrics = self.train_step()
            last = self.step == t.steps
            if t.eval_every and (self.step % t.eval_every == 0 or last):
                metrics["eval_loss"] = self.evaluate()
            if self.step % t.log_every == 0 or last:
                self.prof.log(metrics)  # [profiling] every rank: peak memory, expert load, then the sinks
            history.append(metrics)
            self.checkpointer.after_step(self.step, last or self.guard.stop_requested)  # [checkpoint]
            if self.guard.stop_requested:  # [faults] SIGTERM: this step is saved, stop here
                break
        self.prof.close()  # [profiling] traces, expert_load.jsonl, sinks
        self.guard.close()
        return history


def train(cfg: JobConfig) -> list[dict[str, float]]:
    """Entry point on every rank."""
    # [faults] On an error, each rank prints the last collectives it entered; no barrier (peers may be gone).
    with report_collectives_on_error():
        trainer = Trainer(cfg)
        history = trainer.fit()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    trainer.guard.exit_if_stopped()  # [faults] after a SIGTERM (checkpoint saved): exit 143
    return history
