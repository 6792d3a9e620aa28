"""Measuring the real trainer on this CPU, to check the planner's predictions: memory by allocation, time by step.

Memory. torch's profiler with `profile_memory=True` reports every allocation and free of the CPU allocator
(storage resizes included, which FSDP2 uses for its unsharded parameters), each with the running total of
bytes allocated since profiling started. `MemoryTimeline` profiles the first `steps` training steps of a
Trainer from their start, so it sees everything they allocate: activations, pipeline buffers, FSDP's gathered
copies and communication buffers, and also the model state the steps create (gradients, AdamW's moments). It
tells the state apart by address: the gradients' storages when the optimizer step begins, and the AdamW state
tensors at the end. "Activation memory" is the total minus the state that is alive, at its highest during
forward, backward and gradient synchronisation (the optimizer step, which runs after the activations are
freed, is outside these windows). Parameters were allocated before profiling and are not in the total.

One gap: the profiler records an allocator event only on threads it profiles, and gloo's worker threads
sometimes drop the last reference to a collective's tensors. `FreeWatch` fills it: it keeps a weak reference
to the storage of every tensor an op returns and records, with the time, when that storage dies on any thread.

Time. `time_steps` runs steps with the trainer's own step timer (train_step's wall clock) and returns their
median after warmup.

`run_layouts` trains several layouts one after another in one group of spawned gloo ranks (one torch
thread each), so a validation pays the process start-up once per world size.
"""

from __future__ import annotations

import re
import statistics
import tempfile
import time
import traceback
import weakref
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch._C._profiler import _EventType
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moeyard.job.compose import compose
from moeyard.moe import scratch
from moeyard.parallel.dims import ParallelDims
from moeyard.train.spawn import spawn_ranks
from moeyard.train.trainer import Trainer


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(address, bytes) of the storage behind `t` (a DTensor's local shard)."""
    st = (t.to_local() if isinstance(t, DTensor) else t).untyped_storage()
    return st.data_ptr(), st.nbytes()


@dataclass(frozen=True)
class MemoryMeasurement:
    """What one rank allocated while training, in bytes."""

    activation_peak: int
    """Highest total over forward, backward and gradient sync, model state excluded (module docstring)."""
    params: int
    grads: int
    optimizer: int
    """AdamW state: exp_avg, exp_avg_sq and the step counters."""

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer


class FreeWatch(TorchDispatchMode):
    """Records (time_ns, address) when the storage of any tensor an op returned is freed, on any thread."""

    def __init__(self) -> None:
        super().__init__()
        self.frees: list[tuple[int, int]] = []
        self._refs: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs its local ops, which come back through this mode
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            # A sparse tensor (the CPU combine's CSR weights) has no storage of its own: its index and value
            # tensors are watched where the ops that made them returned them.
            if type(t) is torch.Tensor and t.device.type != "meta" and t.layout == torch.strided:
                self._watch(t.untyped_storage())
        return out

    def _watch(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._refs or storage.nbytes() == 0:
            return
        ptr = storage.data_ptr()

        def freed(_, key=key, ptr=ptr):
            self._refs.pop(key, None)
            self.frees.append((time.time_ns(), ptr))

        self._refs[key] = weakref.ref(storage, freed)


class MemoryTimeline:
    """Profiles a Trainer's first steps and finds its activation peak (module docstring)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.grad_snapshots: list[set[int]] = []
        self.grad_bytes = 0
        forward_backward = trainer.forward_backward

        def marked(*args, **kwargs):
            self._mark("start")
            return forward_backward(*args, **kwargs)

        trainer.forward_backward = marked
        trainer.optimizer.register_step_pre_hook(lambda *_: self._before_optimizer())

    @staticmethod
    def _mark(name: str) -> None:
        with record_function(f"plan_mark:{name}"):
            pass

    def _before_optimizer(self) -> None:
        self._mark("stop")
        grads = dict(_storage(p.grad) for _, p in self.trainer.pm.named_parameters() if p.grad is not None)
        self.grad_snapshots.append(set(grads))
        self.grad_bytes = sum(grads.values())

    def run(self, steps: int) -> MemoryMeasurement:
        watch = FreeWatch()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, watch:
            for _ in range(steps):
                self.trainer.train_step()
        # One entry per storage: FSDP's sharded gradients are views of one flat buffer per unit.
        params = dict(_storage(p) for _, p in self.trainer.pm.named_parameters())
        opt_state = dict(_storage(v) for s in self.trainer.optimizer.state.values() for v in s.values())
        # parallel/zero.py steps fp32 masters: views of fp32 parameters, separate storages beside bf16 ones.
        masters = (_storage(t) for group in self.trainer.optimizer.param_groups for t in group["params"])
        opt_state.update((ptr, nbytes) for ptr, nbytes in masters if ptr not in params)
        return MemoryMeasurement(
            activation_peak=self._peak(prof, set(params) | set(opt_state), watch.frees),
            params=sum(params.values()),
            grads=self.grad_bytes,
            optimizer=sum(opt_state.values()),
        )

    def _peak(self, prof, state_ptrs: set[int], frees: list[tuple[int, int]]) -> int:
        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            events.append(event)
            stack.extend(event.children)
        marks = sorted((e.start_time_ns, e.name.split(":", 1)[1]) for e in events if e.name.startswith("plan_mark:"))
        allocator = [e for e in events if e.tag == _EventType.Allocation]
        allocs = sorted(
            [(e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size) for e in allocator]
            + [(t, ptr, -1) for t, ptr in frees]  # a free seen twice is counted once
        )
        stops = [t for t, name in marks if name == "stop"]
        windows = list(zip([t for t, name in marks if name == "start"], stops, strict=True))
        state = self._state_allocations(allocs, stops, state_ptrs)
        # Own accounting of this session's allocations: the profiler's running total also counts what earlier
        # profiling sessions in this process allocated and what they free now.
        alive: dict[int, tuple[int, bool]] = {}  # address -> (bytes, is model state)
        other, peak = 0, 0
        self.window_peaks = [0] * len(windows)
        for i, (t, ptr, size) in enumerate(allocs):
            if size > 0:
                if ptr in alive:  # freed on a thread the profiler does not see (gloo's): the address is reused
                    freed, is_state = alive.pop(ptr)
                    other -= 0 if is_state else freed
                alive[ptr] = (size, i in state)
                other += 0 if i in state else size
            elif ptr in alive:
                freed, is_state = alive.pop(ptr)
                other -= 0 if is_state else freed
            for w, (start, stop) in enumerate(windows):
                if start <= t <= stop:
                    self.window_peaks[w] = max(self.window_peaks[w], other)
                    peak = max(peak, other)
        return peak

    def _state_allocations(self, allocs: list, stops: list[int], state_ptrs: set[int]) -> set[int]:
        """Indices of the allocations that are model state: each step's gradients (the last allocation at
        their address before the optimizer step), and the parameters and AdamW state alive at the end."""
        latest: dict[int, int] = {}
        found: set[int] = set()
        snapshots = list(zip(stops, self.grad_snapshots, strict=True))
        for i, (t, ptr, size) in enumerate(allocs):
            while snapshots and t > snapshots[0][0]:
                found.update(latest[p] for p in snapshots.pop(0)[1] if p in latest)
            if size > 0:
                latest[ptr] = i
        for _, ptrs in snapshots:
            found.update(latest[p] for p in ptrs if p in latest)
        return found | {latest[p] for p in state_ptrs if p in latest}


def time_steps(trainer: Trainer, steps: int, warmup: int) -> float:
    """Median seconds of train_step over `steps` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        trainer.train_step()
    return statistics.median(trainer.train_step()["step_time_s"] for _ in range(steps))


@dataclass(frozen=True)
class Job:
    """One layout to run: Hydra overrides, and what to measure."""

    name: str
    overrides: tuple[str, ...]
    memory_steps: int = 0
    """Steps profiled for memory (0: none)."""
    time_steps: int = 0
    """Timed steps after `warmup` (0: none)."""
    warmup: int = 1
    solo: bool = False
    """Every rank trains the whole job as one process would (no parallelism), all at once: a one-process
    reference measured with every core busy, inside a group of spawned ranks."""


def run_job(job: Job, run_dir: str) -> dict:
    """This rank's measurements of `job`: memory and/or the median step time, and the wall seconds."""
    start = time.perf_counter()
    cfg = compose([*job.overrides, f"run.dir={run_dir}", "profiling=off", "train.eval_every=0"])
    trainer = Trainer(cfg, dims=ParallelDims(pp=1, dp=1, tp=1, ep=1, world_size=1) if job.solo else None)
    out: dict = {"name": job.name}
    if job.memory_steps:
        # The experts' kept working memory lives as long as the process; a job measures what a fresh run
        # holds, that buffer included, so it starts without the one an earlier job in this process grew.
        scratch.release()
        timeline = MemoryTimeline(trainer)
        out["memory"] = asdict(timeline.run(job.memory_steps))
        out["window_peaks"] = timeline.window_peaks
    if job.time_steps:
        out["step_s"] = time_steps(trainer, job.time_steps, job.warmup)
    out["wall_s"] = time.perf_counter() - start
    return out


def _rank_main(rank: int, jobs: list[Job], out_dir: str) -> None:
    results = []
    with open(f"{out_dir}/rank{rank}.log", "w") as log, redirect_stdout(log), redirect_stderr(log):
        for job in jobs:
            try:
                results.append(run_job(job, f"{out_dir}/{re.sub('[^A-Za-z0-9]+', '_', job.name)}"))
            except Exception:
                results.append({"name": job.name, "error": traceback.format_exc()})
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_layouts(jobs: list[Job], world: int, timeout_s: float = 600.0) -> list[list[dict]]:
    """Runs `jobs` one after another on `world` spawned gloo ranks (or in this process when world is 1, one
    torch thread); returns, per job, every rank's result dict (an "error" key holds a rank's traceback)."""
    with tempfile.TemporaryDirectory(prefix="moeyard-plan-") as tmp:
        if world == 1:
            before = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                per_rank = [[run_job(job, f"{tmp}/{i}") for i, job in enumerate(jobs)]]
            finally:
                torch.set_num_threads(before)
        else:
            spawn_ranks(_rank_main, (jobs, tmp), world, timeout_s, what="plan measurement")
            per_rank = [torch.load(f"{tmp}/rank{r}.pt", weights_only=True) for r in range(world)]
    return [list(results) for results in zip(*per_rank, strict=True)]
