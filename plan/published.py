"""Published MoE training runs, predicted on paper: the layout as published, beside its published throughput.

Each run is modelled as its system ran it, not as MoEyard would: `Features` switches on the overlaps and
precision the publication describes (MoEyard itself has none of DualPipe, FP8 GEMMs or overlapped gradient
reduction). The throughput compared is tokens per second per GPU, which does not depend on how FLOPs are
counted; TFLOP/s per GPU is printed in this repository's convention (profiling/flops.py, full S x S scores).

- DeepSeek-V3, 2,048 H800 (DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv:2412.19437, sections 3.1-3.3):
  PP16 with DualPipe, EP64 over 8 nodes, ZeRO-1 data parallelism (DP128), no TP; FP8 GEMMs; sequence 4096;
  batch 15,360 sequences. "180K H800 GPU hours per trillion tokens" = 1e12 / (180e3 x 3600 s) = 1,543 tokens/s
  per GPU (about 386 TFLOP/s per GPU by the report's own count).
- Mixtral-8x7B, 64 H100 (NVIDIA Megatron-LM, megatron/core/transformer/moe/README.md, "468 TFLOPS for Mixtral
  8X7B bf16 training" with MCore v0.9; the layout of Megatron-MoE-ModelZoo's runtime_configs/benchmarking/
  runtime.conf: TP1 PP4 EP8 VPP8, micro-batch 1, global batch 256, sequence 4096): 468 TFLOP/s per GPU in
  Megatron's FLOP formula, which for Mixtral equals ours: 82.9 GFLOP per token, so 5,645 tokens/s per GPU.
  Megatron overlaps gradient reduce-scatter and parameter all-gather (distributed optimizer) and fuses
  token permutation; its all-to-all dispatcher does not overlap.
- Qwen3-30B-A3B, 16 H100 (NVIDIA Megatron-Bridge docs/performance-summary.md, 25.09 container, DGX-H100:
  TP1 PP2 VP24 EP8, micro-batch 2, global batch 512, sequence 4096): 10,494 tokens/s per GPU, 241 TFLOP/s
  per GPU (the issue quotes 206-241 across releases). That row's precision is not stated and the runs are
  token-dropping with forced balance; Megatron overlaps gradient reduction and fuses token permutation.

The features change the time only: memory is predicted as MoEyard would run the layout, so `compare(rank=True)`
(and `python -m moeyard.plan.published`) shows where `moeyard plan` ranks each published layout for MoEyard.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from moeyard.job.compose import compose
from moeyard.plan.layouts import enumerate_layouts, plan
from moeyard.plan.planner import Prediction, layout_of, make_planner
from moeyard.plan.ranking import fit_class
from moeyard.plan.timing import Features


@dataclass(frozen=True)
class PublishedRun:
    """A published layout and its published throughput."""

    name: str
    overrides: tuple[str, ...]
    nodes: int
    gpus_per_node: int
    gpu: str
    features: Features
    tokens_per_s_per_gpu: float
    """Published, or derived from a published figure as `derivation` says."""
    published_tflops: float
    derivation: str


RUNS = (
    PublishedRun(
        name="DeepSeek-V3, 2048 H800",
        overrides=(
            "model=deepseek_v3",
            "train.seq_len=4096",
            "train.batch_size=15360",
            "train.micro_batches=120",
            "train.dtype=bf16",
            "parallel.pp=16",
            "parallel.ep=64",
            "parallel.tp=1",
            "parallel.dp=128",
            "parallel.dp_mode=replicate",
        ),
        nodes=256,
        gpus_per_node=8,
        gpu="h800",
        features=Features(
            overlap_ep=True,
            overlap_pp=True,
            overlap_dp=True,
            dualpipe=True,
            fp8=True,
            dedup_ib=True,
            comm_sms=20 / 132,
            mtp_depth=1,
            fused_permute=True,
        ),
        tokens_per_s_per_gpu=1e12 / (180e3 * 3600),
        published_tflops=386.0,
        derivation="180K H800 GPU hours per trillion tokens",
    ),
    PublishedRun(
        name="Mixtral-8x7B, 64 H100",
        overrides=(
            "model=mixtral_8x7b",
            "train.seq_len=4096",
            "train.batch_size=256",
            "train.micro_batches=16",
            "train.dtype=bf16",
            "parallel.pp=4",
            "parallel.pp_schedule=interleaved_1f1b",
            "parallel.pp_stages_per_rank=8",
            "parallel.ep=8",
            "parallel.tp=1",
            "parallel.dp=16",
            "parallel.dp_mode=replicate",
        ),
        nodes=8,
        gpus_per_node=8,
        gpu="h100",
        features=Features(overlap_dp=True, fused_permute=True),
        tokens_per_s_per_gpu=468e12 / 82.9e9,
        published_tflops=468.0,
        derivation="468 TFLOP/s / 82.9 GFLOP per token",
    ),
    PublishedRun(
        name="Qwen3-30B-A3B, 16 H100",
        overrides=(
            "model=qwen3_30b_a3b",
            "train.seq_len=4096",
            "train.batch_size=512",
            "train.micro_batches=32",
            "train.dtype=bf16",
            "parallel.pp=2",
            "parallel.pp_schedule=interleaved_1f1b",
            "parallel.pp_stages_per_rank=24",
            "parallel.ep=8",
            "parallel.tp=1",
            "parallel.dp=8",
            "parallel.dp_mode=replicate",
        ),
        nodes=2,
        gpus_per_node=8,
        gpu="h100",
        features=Features(overlap_dp=True, fused_permute=True),
        tokens_per_s_per_gpu=10494.0,
        published_tflops=241.0,
        derivation="published tokens/s per GPU",
    ),
)


@dataclass(frozen=True)
class Comparison:
    run: PublishedRun
    prediction: Prediction
    enumerated: bool
    """Whether `moeyard plan` lists the published layout among its candidates for the job on that cluster."""
    row: int | None = None
    """Its row in the planner's ranking of the job (ranking.py), when `compare(rank=True)` ranked it."""
    of: int | None = None
    """The ranking's length."""
    fit: str = ""
    """Its memory class there (ranking.py: yes, tight, NO) as MoEyard would run it."""

    @property
    def predicted_tokens_per_s_per_gpu(self) -> float:
        return self.prediction.tokens_per_s / self.prediction.world

    @property
    def ratio(self) -> float:
        """Predicted over published throughput."""
        return self.predicted_tokens_per_s_per_gpu / self.run.tokens_per_s_per_gpu


def compare(run: PublishedRun, calibration: str | None = None, rank: bool = False) -> Comparison:
    """The planner's prediction of `run`'s layout, on its cluster, with its system's features; `rank`: also
    where the planner ranks it among every layout of the job (a whole plan: tens of seconds for the 16- and
    64-GPU runs on one CPU core, minutes for DeepSeek-V3's 2,048 GPUs)."""
    cluster = (f"cluster.gpu={run.gpu}", f"cluster.nodes={run.nodes}", f"cluster.gpus_per_node={run.gpus_per_node}")
    cfg = compose([*run.overrides, *cluster])
    world = run.nodes * run.gpus_per_node
    layout = layout_of(copy.copy(cfg), world)
    if rank:
        result = plan(cfg, calibration, features=run.features)
        row = result.position(layout)
        assert row is not None, f"{run.name}: the planner does not enumerate {layout.label()}"
        prediction = result.predictions[row - 1]
        return Comparison(run, prediction, True, row, len(result.predictions), result.fit_class(prediction))
    planner = make_planner(cfg, calibration)
    planner.features = run.features
    prediction = planner.predict(layout)
    enumerated = layout in enumerate_layouts(cfg, world, run.gpus_per_node, run.nodes)
    return Comparison(run, prediction, enumerated, fit=fit_class(prediction, cfg.cluster.memory_margin))


def table(comparisons: list[Comparison]) -> str:
    lines = [
        f"{'run':<26} {'layout':<40} {'planner row':>14} {'peak GB':>7} {'fits':>5} {'predicted tok/s/GPU':>19}"
        f" {'published':>10} {'ratio':>6} {'pred TFLOP/s':>12} {'published TFLOP/s':>17}"
    ]
    for c in comparisons:
        row = f"{c.row} of {c.of}" if c.row else ("listed" if c.enumerated else "not listed")
        lines.append(
            f"{c.run.name:<26} {c.prediction.layout.label():<40} {row:>14} {c.prediction.worst.total / 1e9:>7.1f}"
            f" {c.fit:>5} {c.predicted_tokens_per_s_per_gpu:>19.0f} {c.run.tokens_per_s_per_gpu:>10.0f}"
            f" {c.ratio:>6.2f} {c.prediction.tflops_per_device:>12.0f} {c.run.published_tflops:>17.0f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m moeyard.plan.published: the table with each layout's row in its plan
    print(table([compare(run, rank=True) for run in RUNS]))
