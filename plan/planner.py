"""One layout's predicted memory and step time (`Planner.predict`), calibration files, and the pre-flight.

A layout is (tp, pp, ep, dp, virtual stages, micro-batches, recomputation, FSDP or replicate, schedule);
layouts.py enumerates and ranks them. The pre-flight predicts the configured layout before any process starts
and stops a job whose worst rank is predicted over the device's usable memory, with one line naming the figure
and the limit; `cluster.preflight=false` lets it proceed.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path

from moeyard.job.schema import JobConfig
from moeyard.moe.config import ModelConfig, MoEConfig
from moeyard.parallel.config import uses_fsdp
from moeyard.parallel.dims import ParallelDims
from moeyard.parallel.memory import ShardProbe, probe_shards, stage_memory, stage_param_split
from moeyard.plan.activations import FP32, Shape
from moeyard.plan.calibration import Calibration, default_calibration
from moeyard.plan.cluster import ClusterConfig, check_cluster, ranks_per_node, resolve_kind
from moeyard.plan.memory import RankPeak, rank_peak
from moeyard.plan.timing import Features, StepTime, Topology, one_device_step_s, step_time
from moeyard.profiling.devices import GPUS, DeviceSpec


@dataclass(frozen=True)
class Layout:
    """How the ranks run the job."""

    tp: int
    pp: int
    dp: int
    ep: int
    vpp: int = 1
    micro_batches: int = 1
    ac: str = "none"
    dp_mode: str = "replicate"
    schedule: str = "1f1b"
    sp: bool = False
    pp_layers: tuple[int, ...] = ()
    cp: int = 1
    """Context-parallel ranks sharing each row (parallel.cp)."""

    @staticmethod
    def single(**changes) -> Layout:
        """One process's layout with `changes`, e.g. `Layout.single(dp=2, ep=2, micro_batches=2)`."""
        return replace(Layout(tp=1, pp=1, dp=1, ep=1), **changes)

    def overrides(self) -> list[str]:
        """The Hydra overrides that select this layout."""
        out = [
            f"parallel.tp={self.tp}",
            f"parallel.pp={self.pp}",
            f"parallel.dp={self.dp}",
            f"parallel.ep={self.ep}",
            f"parallel.cp={self.cp}",
            f"parallel.pp_stages_per_rank={self.vpp}",
            f"parallel.pp_schedule={self.schedule}",
            f"parallel.activation_checkpoint={self.ac}",
            f"parallel.dp_mode={self.dp_mode}",
            f"parallel.sequence_parallel={str(self.sp).lower()}",
            f"train.micro_batches={self.micro_batches}",
        ]
        if self.pp_layers:
            out.append(f"parallel.pp_layers=[{','.join(map(str, self.pp_layers))}]")
        return out

    @property
    def world(self) -> int:
        """Ranks the layout runs on (ep folds over dp x cp x tp)."""
        return self.tp * self.pp * self.dp * self.cp

    def name(self) -> str:
        """A short name from what differs from one process, e.g. tp2-sp-pp2-v2-ep2-dp2-fsdp-ac-full (the
        micro-batch count left out): the tests' and benchmarks' layout ids."""
        parts = [f"tp{self.tp}" + ("-sp" if self.sp else "")] if self.tp > 1 else []
        if self.pp > 1:
            schedule = {"gpipe": "-gpipe", "interleaved_1f1b": f"-v{self.vpp}"}.get(self.schedule, "")
            parts.append(f"pp{self.pp}{schedule}")
            parts += ["+".join(map(str, self.pp_layers))] if self.pp_layers else []
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += [f"dp{self.dp}" + ("" if self.dp_mode == "replicate" else f"-{self.dp_mode}")] if self.dp > 1 else []
        parts += [f"ac-{self.ac}"] if self.ac != "none" else []
        return "-".join(parts) or "single"

    def label(self) -> str:
        sched = {"interleaved_1f1b": f" v{self.vpp}", "gpipe": " gpipe"}.get(self.schedule, "") if self.pp > 1 else ""
        ac = {"none": "-", "selective": "sel", "full": "full"}[self.ac]
        return (
            f"tp{self.tp}{'sp' if self.sp else ''} pp{self.pp}{sched}{f' cp{self.cp}' if self.cp > 1 else ''}"
            f" ep{self.ep} dp{self.dp}"
            f"{'' if self.dp_mode == 'replicate' else ' ' + self.dp_mode} m{self.micro_batches} ac:{ac}"
        )


def layout_of(cfg: JobConfig, world: int) -> Layout:
    """The layout a (validated) config asks for."""
    p, dims = cfg.parallel, ParallelDims.from_config(cfg.parallel, world)
    return Layout(
        tp=dims.tp,
        pp=dims.pp,
        dp=dims.dp,
        ep=dims.ep,
        vpp=p.pp_stages_per_rank,
        micro_batches=cfg.train.micro_batches,
        ac=p.activation_checkpoint,
        dp_mode=p.dp_mode if dims.dp_cp > 1 else "replicate",
        schedule=p.pp_schedule,
        sp=p.sequence_parallel and dims.tp > 1,
        pp_layers=tuple(p.pp_layers),
        cp=dims.cp,
    )


def apply_layout(cfg: JobConfig, layout: Layout) -> JobConfig:
    """A copy of `cfg` running `layout` (it shares the other groups' objects with `cfg`: read them only)."""
    out = copy.copy(cfg)
    out.parallel = replace(
        cfg.parallel,
        tp=layout.tp,
        pp=layout.pp,
        dp=layout.dp,
        ep=layout.ep,
        cp=layout.cp,
        pp_stages_per_rank=layout.vpp,
        pp_schedule=layout.schedule,
        activation_checkpoint=layout.ac,
        dp_mode=layout.dp_mode,
        sequence_parallel=layout.sp,
        pp_layers=list(layout.pp_layers),
    )
    out.train = replace(cfg.train, micro_batches=layout.micro_batches)
    return out


@dataclass(frozen=True)
class Prediction:
    """A layout's predicted peak memory (its worst pipeline rank) and step time."""

    layout: Layout
    peaks: list[RankPeak]
    time: StepTime
    limit_bytes: float
    tokens_per_step: int
    flops_per_token: float
    world: int
    peak_tflops: float

    @property
    def worst(self) -> RankPeak:
        return max(self.peaks, key=lambda p: p.total)

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.limit_bytes

    @property
    def headroom(self) -> float:
        """The share of usable memory the worst rank leaves free (negative: over the limit)."""
        return 1 - self.worst.total / self.limit_bytes

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.time.total

    @property
    def tflops_per_device(self) -> float:
        return self.flops_per_token * self.tokens_per_s / self.world / 1e12

    @property
    def mfu(self) -> float:
        return self.tflops_per_device / self.peak_tflops


@dataclass
class Planner:
    """Predicts layouts of one job on one cluster; caches the meta-device shard probes per (tp, ep)."""

    cfg: JobConfig
    device: DeviceSpec
    cal: Calibration
    per_node: int
    kind: str
    features: Features = Features()
    _probes: dict[tuple[int, int], ShardProbe] = field(default_factory=dict)
    _states: dict[tuple, tuple] = field(default_factory=dict)

    @property
    def bf16(self) -> bool:
        return self.cfg.train.dtype in ("bf16", "auto") and self.kind != "cpu"  # auto: bf16 on a GPU

    def probe(self, tp: int, ep: int) -> ShardProbe:
        if (tp, ep) not in self._probes:
            self._probes[(tp, ep)] = probe_shards(self.cfg.model, self.cfg.moe, self.cfg.parallel, tp, ep)
        return self._probes[(tp, ep)]

    def shape(self, layout: Layout) -> Shape:
        dp_cp = layout.dp * layout.cp  # the ranks FSDP shards over
        t, fsdp_bf16 = self.cfg.train, self.bf16 and dp_cp > 1 and uses_fsdp(layout.dp_mode, dp_cp)
        fsdp_bf16 = fsdp_bf16 or (self.bf16 and self.cfg.parallel.param_dtype == "bf16")  # a bf16 residual stream
        act = 2 if self.bf16 else FP32
        return Shape(
            rows=t.batch_size // layout.micro_batches // layout.dp,
            seq=t.seq_len // layout.cp,
            cp=layout.cp,
            tp=layout.tp,
            sp=layout.sp,
            ep=layout.ep,
            ep_chunks=self.cfg.parallel.ep_chunks if self.cfg.parallel.ep_overlap == "chunked" and layout.ep > 1 else 1,
            headroom=self.cfg.cluster.moe_headroom,
            act=act,
            res=2 if fsdp_bf16 else FP32,
            cast=act,
            math_attention=self.kind == "cpu",
            cpu_eager=self.kind == "cpu" and not self.cfg.parallel.compile,
        )

    def predict(self, layout: Layout) -> Prediction:
        cfg = apply_layout(self.cfg, layout)
        world = layout.world
        dims = ParallelDims.from_config(cfg.parallel, world)
        probe, shape = self.probe(layout.tp, layout.ep), self.shape(layout)
        fsdp_bf16 = self.bf16 and uses_fsdp(layout.dp_mode, dims.dp_cp)
        muon = cfg.optim.name == "muon"  # one momentum buffer per element of Muon's parameters, not two moments
        key = (layout.tp, layout.pp, layout.dp, layout.ep, layout.vpp, layout.dp_mode, layout.pp_layers, layout.cp)
        if key not in self._states:
            self._states[key] = (
                [stage_memory(probe, cfg.model, cfg.parallel, dims, r, fsdp_bf16, muon) for r in range(dims.pp)],
                [stage_param_split(probe, cfg.model, cfg.parallel, dims, r) for r in range(dims.pp)],
            )
        states, splits = self._states[key]
        cache: dict = {}
        m, e, p = cfg.model, cfg.moe, cfg.parallel
        micro = layout.micro_batches
        peaks = [rank_peak(m, e, p, dims, shape, micro, r, states[r], fsdp_bf16, cache) for r in range(dims.pp)]
        topo = Topology(self.per_node, self.device, self.cal, self.bf16, self.features)
        time = step_time(m, e, p, dims, shape, micro, topo, states, splits, cache)
        return Prediction(
            layout=layout,
            peaks=peaks,
            time=time,
            limit_bytes=self.device.usable_bytes,
            tokens_per_step=cfg.train.batch_size * cfg.train.seq_len,
            flops_per_token=train_flops_per_token(cfg.model, cfg.moe, cfg.train.seq_len),
            world=world,
            peak_tflops=self.device.peak_tflops,
        )


def train_flops_per_token(model: ModelConfig, moe: MoEConfig, seq_len: int) -> float:
    """Model FLOPs per trained token (profiling/flops.py's convention: full S x S scores), MLA included."""
    from moeyard.profiling.flops import train_flops_per_token as gqa_flops

    if getattr(model, "attention", "gqa") != "mla":
        return gqa_flops(model, moe, seq_len)
    from moeyard.plan.timing import attention_work, ffn_work

    shape = Shape(rows=1, seq=seq_len)
    total = 2 * model.dim * model.vocab_size
    for layer in range(model.n_layers):
        gemm, core, _ = attention_work(model, shape)
        linear, router, _ = ffn_work(model, moe, shape, model.is_moe_layer(layer))
        total += (gemm + 2 * core + linear + router) / seq_len
    return 3 * total


def make_planner(cfg: JobConfig, calibration: str | None = None, measure: bool = True) -> Planner:
    """The planner for `cfg.cluster` (and a calibration file, overriding cluster.calibration); `measure`:
    measure a CPU's rates if they are not cached (the pre-flight needs only memory and skips it)."""
    cluster: ClusterConfig = cfg.cluster
    check_cluster(cluster)
    kind = resolve_kind(cluster)
    per_node = ranks_per_node(cfg)
    path = calibration or cluster.calibration
    cal, device = default_calibration(kind), None
    if path:
        cal, device = load_calibration(path, kind)
    if device is None:
        device = cpu_device(per_node, measure) if kind == "cpu" else GPUS[kind]
    if cluster.memory_gb is not None:
        device = replace(device, memory_bytes=cluster.memory_gb * 1e9, reserved_bytes=0.0, fragmentation=0.0)
    return Planner(cfg, device, cal, per_node, kind)


NOMINAL_CPU = {"peak_tflops": 0.05, "hbm_gbps": 10.0, "link_gbps": 1.0, "latency_s": 1e-4}
"""Stand-in rates when only memory matters (the pre-flight)."""


def cpu_device(per_node: int, measure: bool = True) -> DeviceSpec:
    """A CPU rank: one core with one torch thread, its share of the host's memory; its rates measured once
    and cached (calibration.py), or nominal ones without `measure`."""
    from moeyard.plan.cpu import cpu_rates

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rates = cpu_rates() if measure else NOMINAL_CPU
    spec = DeviceSpec(
        name="cpu",
        memory_bytes=ram / max(1, per_node),
        reserved_bytes=0.4e9,  # Python, torch and gloo per process (README: about 370 MB)
        fragmentation=0.0,
        peak_tflops=0.0,
        fp32_tflops=0.0,
        hbm_gbps=0.0,
        intra_gbps=0.0,
        inter_gbps=0.0,
        intra_latency_s=0.0,
        inter_latency_s=0.0,
    )
    return spec.with_cpu_rates(rates)


def _preflight_kind(cfg: JobConfig) -> str | None:
    """The device to check against: cluster.gpu when set, else this machine's GPU when the job trains on
    it; None (no check) for a CPU job with cluster.gpu=auto, and for a GPU job submitted from a machine
    without one (set cluster.gpu to what the nodes have). The GPU is found from the driver's files, so
    this launching process never initialises CUDA (plan/cluster.py `gpu_names`)."""
    if cfg.cluster.gpu != "auto":
        return cfg.cluster.gpu
    if cfg.train.device != "cpu":
        kind = resolve_kind(cfg.cluster)
        return kind if kind != "cpu" else None
    return None


def _local_ranks(cfg: JobConfig, world: int) -> int:
    return cfg.launcher.ranks_per_node()


def preflight(cfg: JobConfig, world: int) -> str | None:
    """None if the configured layout is predicted to fit (or cannot be checked here), else the error line."""
    import torch.distributed as dist

    kind = _preflight_kind(cfg)
    if not cfg.cluster.preflight or kind is None or dist.is_initialized():
        return None
    per_node = cfg.cluster.gpus_per_node or _local_ranks(cfg, world)
    cfg = copy.copy(cfg)
    cfg.cluster = replace(cfg.cluster, gpu=kind, gpus_per_node=per_node)
    planner = make_planner(cfg, measure=False)
    limit = planner.device.usable_bytes
    if kind == "cpu" and _small(cfg, world, limit):
        return None
    prediction = planner.predict(layout_of(cfg, world))
    worst = prediction.worst
    if worst.total <= limit:
        return None
    gb = lambda n: f"{n / 1e9:.1f}"
    return (
        f"predicted peak memory {gb(worst.total)} GB per rank (pipeline rank {worst.pp_rank}: model state"
        f" {gb(worst.model_state)} + activations {gb(worst.activations)} + backward working set"
        f" {gb(worst.working)} + buffers {gb(worst.buffers)} GB) exceeds the {gb(limit)} GB usable on"
        f" cluster.gpu={kind} ({planner.device.name}) (rule: `moeyard plan` lists the layouts that fit;"
        " cluster.preflight=false proceeds anyway)"
    )


def _small(cfg: JobConfig, world: int, limit: float) -> bool:
    """A quick bound for CPU jobs: the whole model's state on every rank and a generous activation
    allowance fit in a quarter of the limit (the tests' and demos' tiny models), so no probe is needed."""
    import torch

    from moeyard.moe.model import Transformer

    with torch.device("meta"):
        params = sum(p.numel() for p in Transformer(cfg.model, cfg.moe).parameters())
    t = cfg.train
    tokens = t.batch_size * t.seq_len
    per_token = 64 * cfg.model.dim * cfg.model.n_layers + 16 * cfg.model.vocab_size
    return 20 * params + per_token * tokens < limit / 4


def load_calibration(path: str | Path, kind: str) -> tuple[Calibration, DeviceSpec | None]:
    """The calibration in `path` (gpu_check output, or a CPU profile) and, for a CPU profile, its device."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") == "cpu":
        rates = tuple((op, float(gbps)) for op, gbps in data["device"].get("collective_gbps", ()))
        device = DeviceSpec(**{**data["device"], "collective_gbps": rates})
        return Calibration(**{**data["calibration"], "source": str(path)}), device
    if "models" in data or "layers" in data:
        return from_gpu_check(data, kind, str(path)), None
    raise ValueError(f"--calibration {path}: neither benchmarks/gpu_check.py output nor a CPU profile")


def from_gpu_check(data: dict, kind: str, source: str) -> Calibration:
    """Efficiencies from benchmarks/gpu_check.py's JSON (module docstring)."""
    cal = replace(default_calibration(kind), source=source)
    peak = float(data.get("peak_tflops") or GPUS.get(kind, GPUS["h100"]).peak_tflops)
    floors = [
        v["expert_tflops"]
        for layer in data.get("layers", [])
        if layer.get("dtype") == "bfloat16"
        for v in layer.get("variants", [])
        if str(v.get("variant", "")).startswith("floor") and v.get("expert_tflops")
    ]
    if floors:
        cal = replace(cal, gemm_eff=min(0.95, statistics.median(floors) / peak))
    device = replace(GPUS.get(kind, GPUS["h100"]), peak_tflops=peak)
    runs = {r["model"]: r for r in data.get("models", []) if _is_baseline_run(r)}
    big = runs.get("mixtral_8x7b_2blocks")
    if big:
        model, moe = _run_shapes(big)
        no_overhead = replace(cal, layer_s=0.0, step_s=0.0)
        predicted = one_device_step_s(model, moe, big["batch"], big["seq_len"], device, no_overhead, bf16=True)
        gemm = one_device_step_s(model, moe, big["batch"], big["seq_len"], device, no_overhead, True, gemm_only=True)
        rest = predicted - gemm
        measured = big["step_ms_median"] / 1e3
        if rest > 0 and measured > gemm:
            scale = rest / (measured - gemm)
            cal = replace(cal, attn_eff=min(0.95, cal.attn_eff * scale), mem_eff=min(0.95, cal.mem_eff * scale))
    small = runs.get("debug")
    if small:
        model, moe = _run_shapes(small)
        no_overhead = replace(cal, layer_s=0.0, step_s=0.0)
        compute = one_device_step_s(model, moe, small["batch"], small["seq_len"], device, no_overhead, bf16=True)
        spare = small["step_ms_median"] / 1e3 - compute - cal.step_s
        cal = replace(cal, layer_s=max(0.0, spare / model.n_layers))
    return cal


def _is_baseline_run(run: dict) -> bool:
    """A gpu_check run the time model describes: bf16 autocast, eager, no activation checkpointing (its
    compiled and checkpointed runs of the same model are measured too, and left out here)."""
    plain = not run.get("compile", False) and run.get("activation_checkpoint", "none") == "none"
    return run.get("precision") == "autocast" and "error" not in run and plain


def _run_shapes(run: dict) -> tuple[ModelConfig, MoEConfig]:
    """The model and MoE configs a gpu_check run recorded with its timing."""
    return ModelConfig(**run["model_config"]), MoEConfig(**run["moe_config"])
