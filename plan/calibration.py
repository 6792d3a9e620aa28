"""How close to its peaks a device gets: the efficiency table, and re-measuring it.

The time model (timing.py) divides FLOPs and bytes by a device's data-sheet peaks (cluster.py) times these
fractions, and adds fixed costs per block and per step. The GPU defaults are stated, from public
measurements rather than fitted to anything here: cuBLAS bf16 GEMMs reach about 70% of an H100's dense peak
(80% on an A100), flash attention forward+backward about 45%, memory-bound kernels about 80% of HBM
bandwidth, NCCL ring collectives about 80% of the link (all-to-all about 65%).

Two ways to re-measure them (plan/planner.py's `load_calibration` reads either file):

- `benchmarks/gpu_check.py --out FILE` on the GPU (`--calibration FILE`, or cluster.calibration=FILE). Keys
  read: `peak_tflops`; `layers[].dtype` and `layers[].variants[]` where `variant` starts with "floor"
  (its `expert_tflops`: the grouped-GEMM rate on real MoE shapes) -> gemm_eff = median rate / peak_tflops;
  `models[]` with `precision` "autocast" (what train.dtype=bf16 runs), `compile` false and
  `activation_checkpoint` "none" (the runs the time model describes; gpu_check also trains each model
  compiled and checkpointed): `model`, `model_config`, `moe_config`, `batch`, `seq_len`, `step_ms_median`,
  each step timed through the real Trainer in one micro-batch. The run of "mixtral_8x7b_2blocks"
  (compute-bound) scales attn_eff and mem_eff so that the one-GPU prediction of that step equals the measured
  one; the run of "debug" (launch-bound) then sets layer_s, the fixed cost per block and micro-batch.
- On a CPU, benchmarks/plan_cpu.py measures the rank's GEMM rate, its memory
  bandwidth and gloo over loopback, then fits one scale on the three efficiencies and the fixed costs to short
  training runs of the real trainer (plan/cpu.py), and writes a JSON with "kind": "cpu", "device" and
  "calibration" keys. On a GPU the per-feature fixed costs (tp_layer_s ...) hide behind queued kernels and
  stay 0; on a CPU, where every op runs on the rank's one core, they are most of a small model's step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace


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
    sp_layer_s: float = 0.0
    """Extra again with sequence parallelism (its redistributions between sharded and replicated)."""
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
