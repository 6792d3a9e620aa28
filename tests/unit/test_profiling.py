"""Step breakdown, throughput keys, torch.profiler traces and the sinks, on real debug-model runs.

One single-process run with profiling=torch_trace and TensorBoard on feeds most checks: the metrics keys the
dashboard and users rely on, breakdown keys only on sampled steps, the Chrome trace file, TensorBoard scalars
and load heatmaps. Unit checks cover the phase timer (wall clock against sleeps), the collective-name
classifier, the rich progress bar and config errors. The collective timings of multi-rank runs are checked in
tests/test_expert_load.py (same 2-rank runs). Run: .venv/bin/pytest -q tests/unit/test_profiling.py
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest
import torch

from moeyard.job.compose import compose
from moeyard.profiling.config import ProfilingConfig
from moeyard.profiling.sinks import ProgressBar, heatmap_image
from moeyard.profiling.timers import StepTimer, comm_kind, comm_times_ms
from moeyard.profiling.trace import TraceProfiler, check_trace_ranks
from moeyard.train.trainer import Trainer

REQUIRED = {
    "step",
    "loss",
    "aux_loss",
    "z_loss",
    "lr",
    "tokens_per_s",
    "tokens_per_s_per_device",
    "mfu",
    "tflops_per_device",
    "peak_mem_gb",
}
PHASES = {
    "time_data_ms",
    "time_forward_ms",
    "time_backward_ms",
    "time_grad_sync_ms",
    "time_optimizer_ms",
    "time_step_ms",
    "time_other_ms",
}


def test_step_timer_times_phases_on_sampled_steps_only() -> None:
    timer = StepTimer(torch.device("cpu"), every=2)
    timer.begin(0)  # metrics step 1: not sampled
    with timer.phase("data"):
        time.sleep(0.01)
    assert timer.end() == {}
    timer.begin(1)  # metrics step 2: sampled
    for _ in range(2):  # two micro-batches add up
        with timer.phase("forward"):
            time.sleep(0.02)
    with timer.phase("optimizer"):
        time.sleep(0.01)
    got = timer.end()
    assert got.keys() == {"time_forward_ms", "time_optimizer_ms", "time_step_ms", "time_other_ms"}
    assert got["time_forward_ms"] >= 40 and got["time_optimizer_ms"] >= 10
    parts = got["time_forward_ms"] + got["time_optimizer_ms"] + got["time_other_ms"]
    assert parts == pytest.approx(got["time_step_ms"])


def test_collective_names_are_classified() -> None:
    assert comm_kind("gloo:all_to_all") == "all_to_all"
    assert comm_kind("gloo:all_reduce") == "all_reduce"
    assert comm_kind("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL") == "all_reduce"
    assert comm_kind("ncclDevKernel_AllGather_RING_LL") == "all_gather"
    assert comm_kind("ncclDevKernel_SendRecv") == "send_recv"
    assert comm_kind("gloo:recv") == "send_recv"
    assert comm_kind("gloo:broadcast") == "other"
    assert comm_kind("aten::mm") is None and comm_kind("c10d::allreduce_") is None  # launches, not the work
    assert comm_kind("nccl:all_reduce") is None  # NCCL's CPU-side range: the kernel is what counts
    assert comm_times_ms([("gloo:send", 1.5), ("gloo:recv", 2.0), ("aten::mm", 9.0)]) == {"comm_send_recv_ms": 3.5}


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("traced")
    cfg = compose(
        [
            "model=debug",
            "train.steps=4",
            "train.eval_every=0",
            "profiling=torch_trace",
            "profiling.breakdown_every=2",
            "train.log_every=1",
            "profiling.tensorboard=true",
            "profiling.progress=false",
            f"run.dir={run_dir}",
        ]
    )
    Trainer(cfg).fit()
    return run_dir


def test_metrics_lines_carry_throughput_and_sampled_breakdown(traced_run: Path) -> None:
    lines = [json.loads(x) for x in (traced_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for m in lines:
        assert m.keys() >= REQUIRED
        assert 0 < m["mfu"] < 1 and m["peak_mem_gb"] > 0.05
        assert m["tokens_per_s_per_device"] == m["tokens_per_s"]  # one device
        assert m["tokens_per_s"] == pytest.approx(8 * 64 / m["step_time_s"])
        assert (m.keys() >= PHASES) == (m["step"] in (2, 4))  # breakdown_every=2
    sampled = lines[3]
    assert sum(sampled[k] for k in PHASES - {"time_step_ms"}) == pytest.approx(sampled["time_step_ms"])
    assert sampled["time_forward_ms"] > 0 and sampled["time_backward_ms"] > 0


def test_torch_trace_writes_a_chrome_trace(traced_run: Path) -> None:
    # wait 1, warmup 1, active 2, repeat 1: one window, recorded over steps 3-4, saved when step 4 ends.
    traces = sorted(p.name for p in (traced_run / "traces").iterdir())
    assert traces == ["rank0_step4.json"]
    events = json.loads((traced_run / "traces" / traces[0]).read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names
    assert any(n.startswith("aten::") for n in names)


def test_tensorboard_gets_scalars_and_load_heatmaps(traced_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(traced_run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/mfu", "train/tokens_per_s", "expert_load/imbalance/layer0"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    images = acc.Images("expert_load/routed")
    assert len(images) == 4 and (images[0].height, images[0].width) == (4 * 12, 8 * 12)  # layers x experts


def test_heatmap_image_scales_each_layer_to_its_max() -> None:
    img = heatmap_image(torch.tensor([[0.0, 5.0], [2.0, 1.0]]).numpy(), cell=1)
    assert img.shape == (2, 2, 3)
    assert (img[0, 1] == img[1, 0]).all()  # each row's maximum gets the top colour
    assert (img[0, 0] == [68, 1, 84]).all()  # zero gets the bottom colour


def test_profiling_off_still_reports_throughput(tmp_path: Path) -> None:
    Trainer(
        compose(["model=debug", "train.steps=2", "train.eval_every=0", "profiling=off", f"run.dir={tmp_path}"])
    ).fit()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m.keys() >= REQUIRED and not PHASES & m.keys() for m in lines)
    assert not (tmp_path / "expert_load.jsonl").exists()


def test_progress_bar_shows_step_loss_throughput_mfu_eta() -> None:
    from rich.console import Console

    out = io.StringIO()
    bar = ProgressBar(10, console=Console(file=out, force_terminal=True, width=140))
    bar.update({"step": 3, "loss": 4.25, "tokens_per_s": 1234.0, "mfu": 0.0123}, "[3/10] loss=4.25")
    bar.progress.refresh()
    bar.close()
    text = out.getvalue()
    assert "[3/10] loss=4.25" in text and "3/10" in text
    assert "loss 4.2500" in text and "1,234 tok/s" in text and "MFU 1.23%" in text and "ETA" in text


def test_trace_ranks_outside_the_job_are_a_config_error() -> None:
    cfg = ProfilingConfig(torch_trace=True, trace_ranks=[0, 3])
    with pytest.raises(ValueError, match=r"profiling.trace_ranks=\[0, 3\] has ranks \[3\] outside the job"):
        check_trace_ranks(cfg, world=2)


def test_memory_snapshot_is_skipped_on_cpu(tmp_path: Path, capsys) -> None:
    trace = TraceProfiler(ProfilingConfig(memory_snapshot=True), 0, torch.device("cpu"), tmp_path)
    trace.close()
    assert "memory_snapshot needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "traces").exists()


@pytest.mark.gpu
def test_cuda_step_timer_and_memory_snapshot(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    timer = StepTimer(torch.device("cuda"), every=1, nvtx=True)
    timer.begin(0)
    with timer.phase("forward"):
        torch.randn(2048, 2048, device="cuda").matmul(torch.randn(2048, 2048, device="cuda"))
    got = timer.end()
    assert got["time_forward_ms"] > 0 and got["time_step_ms"] >= got["time_forward_ms"]
    trace = TraceProfiler(ProfilingConfig(memory_snapshot=True), 0, torch.device("cuda"), tmp_path)
    torch.ones(1024, device="cuda")
    trace.close()
    assert (tmp_path / "traces" / "memory_rank0.pickle").stat().st_size > 0
