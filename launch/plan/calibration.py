"""How close to its peaks a device gets: the efficiency table, and re-measuring it.

The time model (timing.py) divides FLOPs and bytes by a device's data-sheet peaks (cluster.py) times these
fractions, and adds fixed costs per block and per step. The GPU defaults are stated, from public
measurements rather than fitted to anything here: cuBLAS bf16 GEMMs reach about 70% of an H100's dense peak
(80% on an A100), flash attention forward+backward about 45%, memory-bound kernels about 80% of HBM
bandwidth, NCCL ring collectives about 80% of the link (all-to-all about 65%).

Two ways to re-measure them:

- `benchmarks/gpu_check.py --out FILE` on the GPU (`--calibration FILE`, or cluster.calibration=FILE). Keys
  read: `peak_tflops`; `layers[].dtype` and `layers[].variants[]` where `variant` starts with "floor"
  (its `expert_tflops`: the grouped-GEMM rate on real MoE shapes) -> gemm_eff = median rate / peak_tflops;
  `models[]` with `precision` "autocast" (what train.dtype=bf16 runs): `model`, `batch`, `seq_len`,
  `step_ms_median`. The run of "mixtral_8x7b_2blocks" (compute-bound) scales attn_eff and mem_eff so that
  the one-GPU prediction of that step equals the measured one; the run of "debug" (launch-bound) then sets
  layer_s, the fixed cost per block and micro-batch. The two model shapes are gpu_check.py's own.
- On a CPU, benchmarks/plan_cpu.py (and the CPU validation test) measure the rank's GEMM rate, its memory
  bandwidth and gloo over loopback, then fit one scale on the three efficiencies and the fixed costs to short
  training runs of the real trainer (launch/plan/cpu.py), and write a JSON with "kind": "cpu", "device" and
  "calibration" keys. On a GPU the per-feature fixed costs (tp_layer_s ...) hide behind queued kernels and
  stay 0; on a CPU, where every op runs on the rank's one core, they are most of a small model's step.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from launch.plan.cluster import GPUS, DeviceSpec
from moe.config import ModelConfig, MoEConfig


@dataclass(frozen=True)
class Calibration:
    """Achieved fractions of a device's peaks, and fixed costs."""

    gemm_eff: float
    """Fraction of peak_tflops a matmul reaches (dense and grouped)."""
    attn_eff: float
    """Fraction of peak_tflops the attention core reaches, forward and backward (causal FLOPs)."""
    mem_eff: float
    """Fraction of hbm_gbps that memory-bound kernels reach (norms, activations, permutations, optimizer)."""
    coll_eff: float
    """Fraction of link bandwidth of all-reduce, reduce-scatter, all-gather and pipeline sends."""
    a2a_eff: float
    """Fraction of link bandwidth of an all-to-all."""
    layer_s: float
    """Fixed seconds per block and micro-batch, forward + backward (kernel launches, host syncs, Python)."""
    step_s: float
    """Fixed seconds per step (optimizer launch, data, metrics)."""
    tp_layer_s: float = 0.0
    """Extra fixed seconds per block and micro-batch under tensor parallelism (DTensor's dispatch on a CPU)."""
    ep_layer_s: float = 0.0
    """Extra per MoE block and micro-batch under expert parallelism (the count exchange and host read)."""
    fsdp_layer_s: float = 0.0
    """Extra per block and micro-batch under FSDP (its hooks and collective launches)."""
    pp_micro_s: float = 0.0
    """Extra per stage and micro-batch under pipelining (the schedule's bookkeeping and sends)."""
    source: str = "defaults"

    def to_json(self) -> dict:
        return asdict(self)


GPU_DEFAULT = Calibration(
    gemm_eff=0.70,
    attn_eff=0.45,
    mem_eff=0.80,
    coll_eff=0.80,
    a2a_eff=0.65,
    layer_s=100e-6,
    step_s=0.01,
    source="stated defaults",
)
A100_DEFAULT = replace(GPU_DEFAULT, gemm_eff=0.80)
CPU_DEFAULT = Calibration(
    gemm_eff=0.60,
    attn_eff=0.30,
    mem_eff=0.50,
    coll_eff=1.0,  # the loopback bandwidth is measured as achieved
    a2a_eff=1.0,
    layer_s=3e-3,
    step_s=0.02,
    source="uncalibrated CPU defaults",
)


def default_calibration(kind: str) -> Calibration:
    if kind == "cpu":
        return CPU_DEFAULT
    return A100_DEFAULT if kind == "a100" else GPU_DEFAULT


GPU_CHECK_MODELS: dict[str, tuple[ModelConfig, MoEConfig]] = {
    "debug": (ModelConfig(), MoEConfig(expert_hidden=32)),
    "mixtral_8x7b_2blocks": (
        ModelConfig(
            name="mixtral_8x7b_2blocks",
            vocab_size=32000,
            dim=4096,
            n_layers=2,
            n_heads=32,
            n_kv_heads=8,
            ffn_hidden=14336,
            max_seq_len=4096,
        ),
        MoEConfig(num_experts=8, top_k=2, expert_hidden=14336),
    ),
}
"""The model shapes benchmarks/gpu_check.py trains (its DEBUG and MIXTRAL_2 cases)."""


@dataclass(frozen=True)
class CpuProfile:
    """A CPU rank's measured rates and the fitted calibration, as benchmarks/plan_cpu.py writes them."""

    device: DeviceSpec
    calibration: Calibration


def load_calibration(path: str | Path, kind: str) -> tuple[Calibration, DeviceSpec | None]:
    """The calibration in `path` (gpu_check output, or a CPU profile) and, for a CPU profile, its device."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") == "cpu":
        rates = tuple((kind, float(gbps)) for kind, gbps in data["device"].get("collective_gbps", ()))
        device = DeviceSpec(**{**data["device"], "collective_gbps": rates})
        return Calibration(**{**data["calibration"], "source": str(path)}), device
    if "models" in data or "layers" in data:
        return from_gpu_check(data, kind, str(path)), None
    raise ValueError(f"--calibration {path}: neither benchmarks/gpu_check.py output nor a CPU profile")


def from_gpu_check(data: dict, kind: str, source: str) -> Calibration:
    """Efficiencies from benchmarks/gpu_check.py's JSON (module docstring)."""
    from launch.plan.timing import one_device_step_s  # timing imports this module's Calibration

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
    runs = {r["model"]: r for r in data.get("models", []) if r.get("precision") == "autocast" and "error" not in r}
    big = runs.get("mixtral_8x7b_2blocks")
    if big:
        model, moe = GPU_CHECK_MODELS["mixtral_8x7b_2blocks"]
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
        model, moe = GPU_CHECK_MODELS["debug"]
        no_overhead = replace(cal, layer_s=0.0, step_s=0.0)
        compute = one_device_step_s(model, moe, small["batch"], small["seq_len"], device, no_overhead, bf16=True)
        spare = small["step_ms_median"] / 1e3 - compute - cal.step_s
        cal = replace(cal, layer_s=max(0.0, spare / model.n_layers))
    return cal
