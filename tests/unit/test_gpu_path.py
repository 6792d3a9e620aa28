"""The GPU path, checked on CPU: device placement, the host-synchronisation budget, bf16.

- Training steps run under CUDA's placement rules (tests/device_check.py tells host tensors from device
  ones on CPU by how they were made): forward and backward, gradient clipping, the guard, the fused
  optimizer, the bias update and a logging step's packing of losses, flags, peak memory and expert load.
- Synchronising calls are counted (tests/sync_counter.py): none in the router, none in a dropless MoE layer,
  one per layer with capacity (the kept count), none in a training step between logging steps, and one host
  read on a logging step. Batches reach the device as on CUDA (pinned, non_blocking, the next one while a
  step runs), and the counter catches the old blocking copies when they are put back.
- A step under bf16 autocast runs the experts' grouped matmuls in bf16 with fp32 master weights, router and
  losses, and stays within bf16 tolerance of the fp32 step.

    .venv/bin/pytest -q tests/unit/test_gpu_path.py
"""

from __future__ import annotations

import pytest
import torch

import moeyard.train.data as data_mod
import moeyard.train.trainer as trainer_mod
from moeyard.job.compose import compose
from moeyard.moe.config import MoEConfig
from moeyard.moe.experts import choose_expert_path
from moeyard.moe.layer import MoELayer
from moeyard.plan import planner as planner_mod
from moeyard.plan.cluster import detect_kind, gpu_names
from moeyard.plan.planner import preflight
from moeyard.train.config import computes_in_bf16
from moeyard.train.trainer import Trainer, pick_device
from tests.device_check import DeviceMixCheck
from tests.helpers import TINY
from tests.sync_counter import SyncCounter

FAST_LR = ["optim.lr=1e-2", "optim.warmup_steps=1"]
GPU_LIKE = [*TINY, "optim.fused=on", "train.log_every=3", "train.steps=3", "profiling.expert_load=true"]
"""TINY with the fused optimizer (CUDA's default: the non-finite skip is decided on the device)."""


def _layer(**moe) -> tuple[MoELayer, torch.Tensor]:
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(num_experts=8, top_k=2, expert_hidden=16, **moe))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer, torch.randn(2, 12, 16, requires_grad=True)


@pytest.mark.parametrize(
    ("moe", "budget"),
    [
        ({}, 0),
        ({"router": "sigmoid_topk", "n_groups": 4, "topk_groups": 2, "num_shared_experts": 1}, 0),
        ({"router": "expert_choice", "capacity_factor": 1.0}, 0),
        ({"capacity_factor": 1.0}, 1),
        ({"capacity_factor": 1.0, "drop_policy": "position", "bias_update_rate": 0.01}, 1),
    ],
    ids=["softmax-dropless", "sigmoid-groups-shared", "expert-choice", "capacity", "capacity-position"],
)
def test_moe_layer_holds_the_sync_budget(moe: dict, budget: int) -> None:
    layer, x = _layer(**moe)
    with SyncCounter() as router_syncs:
        layer.router(x)
    assert router_syncs.calls == []  # none in the router, capacity included
    with SyncCounter() as syncs:
        layer(x).square().sum().backward()
    # Dropless routing knows its kept count from the shapes; capacity reads it once (sizing the expert rows).
    assert len(syncs.calls) == budget, syncs.calls


@pytest.fixture
def pinned_batches(monkeypatch) -> None:
    """Batches take CUDA's path on CPU: pinned (the counter's stand-in without an accelerator), then copied."""
    monkeypatch.setattr(data_mod, "pins_memory", lambda device: True)


def test_steps_between_logging_steps_never_read_the_device(tmp_path, pinned_batches) -> None:
    cfg = compose([*GPU_LIKE, "moe.capacity_factor=null", f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    reads = []
    read = trainer_mod.read_to_host
    trainer_mod.read_to_host = lambda t: reads.append(t.numel()) or read(t)
    try:
        for step in range(3):
            with SyncCounter() as syncs:
                metrics = trainer.train_step(log=step == 2)
            if step < 2:
                assert syncs.calls == [] and "loss" not in metrics, syncs.calls
    finally:
        trainer_mod.read_to_host = read
    # The logging step's scalars reach the device without a copy: its one synchronisation is the read.
    assert [what for what, _ in syncs.calls] == ["Tensor.tolist"], "\n".join(map(str, syncs.calls))
    # The logging step: losses, guard flags, peak memory and expert load came back in one read.
    assert len(reads) == 1 and reads[0] > 9 + 2 * 4 * 8
    assert metrics["loss"] > 0 and metrics["peak_mem_gb"] >= 0 and metrics["tokens_per_s"] > 0


def test_the_counter_catches_blocking_host_to_device_copies(tmp_path, pinned_batches, monkeypatch) -> None:
    """The old batch copy (`rows.to(device)` from pageable memory) put back into the trainer, and the other
    host-to-device patterns that make the host wait, each counted; the pinned non_blocking copy is not."""
    cfg = compose([*GPU_LIKE, "moe.capacity_factor=null", f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    monkeypatch.setattr(data_mod, "to_device", lambda t, device: t.to(device))
    with SyncCounter() as syncs:
        trainer.train_step(log=False)
    # Step 0's batch and the prefetched step 1's, inputs and targets each.
    assert [what for what, _ in syncs.calls] == ["host-to-device to from pageable memory"] * 4, syncs.calls
    device = trainer.device
    with SyncCounter() as syncs:
        rows = torch.ones(2, 3)
        rows.pin_memory().to(device, non_blocking=True)  # the new path: not counted
        rows.pin_memory().to(device)  # pinned but blocking
        torch.tensor(1.0, device=device)  # the old guard flag: built on the host, then copied
        torch.zeros(2, 3, device=device).copy_(rows)  # pageable
    assert [what for what, _ in syncs.calls] == [
        "blocking host-to-device to",
        "host-to-device tensor from pageable memory",
        "host-to-device copy_ from pageable memory",
    ], syncs.calls


def test_the_next_batch_is_on_the_device_before_its_step(tmp_path, pinned_batches) -> None:
    """After step N's work is queued, step N+1's batch has been copied (pinned, non_blocking): it is the
    batch that step trains on."""
    cfg = compose([*GPU_LIKE, f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    with SyncCounter() as syncs:  # its stand-in pins without an accelerator
        trainer.train_step(log=False)
    assert syncs.calls == []
    step, (x, y) = trainer.batches._next
    want_x, want_y = trainer.data.batch(1, cfg.train.batch_size)
    assert step == 1 and torch.equal(x, want_x) and torch.equal(y, want_y)
    assert trainer.batches.get(1)[0] is x and trainer.batches._next is None


def test_training_steps_keep_every_tensor_on_the_device(tmp_path) -> None:
    """The trainer, MoE layers, guard, optimizer, profiler and expert-load tracker under CUDA's placement
    rules (tests/device_check.py), over steps between logging steps and a logging step."""
    cfg = compose([*GPU_LIKE, "moe.num_shared_experts=1", "moe.capacity_factor=1.0", f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    with DeviceMixCheck() as check:
        history = [trainer.train_step(log=step == 2) for step in range(3)]
    assert check.violations == [] and history[-1]["loss"] > 0


def test_the_device_check_catches_a_host_accumulator() -> None:
    """The pattern of the old `_reduce_losses`: a host vector accumulating device scalars in place."""
    losses = [torch.ones((), device="cpu") * 2]  # explicit device: the device's
    with DeviceMixCheck() as check:
        vec = torch.zeros(2, dtype=torch.float64)
        vec[0] = torch.stack(losses).double().mean()  # a cross-device copy: allowed (and a sync on CUDA)
        vec[1] += losses[0].double()
        torch.stack([torch.zeros(()), losses[0]])
        losses[0] * torch.zeros(())  # a host scalar with device tensors: allowed
        torch.zeros(3) + torch.ones(3, device="cpu")
    assert len(check.violations) == 3, check.violations
    assert "host tensor ()" in check.violations[0] and "joined" in check.violations[1]


def test_bf16_step_is_close_to_fp32_with_fp32_masters(tmp_path) -> None:
    """bf16 has an 8-bit mantissa (relative rounding 2**-9 ~ 2e-3 per op). Over four steps the losses agree
    within 5e-3 relative (measured: 1.3e-3), while the fp32 losses fall by more than 20% (measured: 25%)."""
    seen = {}
    original = torch.nn.functional.grouped_mm if hasattr(torch.nn.functional, "grouped_mm") else None

    def spy(a, b, *args, **kwargs):
        seen.setdefault("dtypes", set()).add((a.dtype, b.dtype))
        return original(a, b, *args, **kwargs)

    losses = {}
    for dtype in ("fp32", "bf16"):
        cfg = compose([*TINY, *FAST_LR, "train.steps=4", f"train.dtype={dtype}", f"run.dir={tmp_path / dtype}"])
        trainer = Trainer(cfg)
        if dtype == "bf16" and original is not None:
            torch.nn.functional.grouped_mm = spy
        try:
            losses[dtype] = [trainer.train_step()["loss"] for _ in range(4)]
        finally:
            if original is not None:
                torch.nn.functional.grouped_mm = original
        masters = {p.dtype for _, p in trainer.pm.named_parameters()}
        states = {v.dtype for s in trainer.optimizer.state.values() for v in s.values() if v.is_floating_point()}
        assert masters == states == {torch.float32}
    if original is not None:
        assert seen["dtypes"] == {(torch.bfloat16, torch.bfloat16)}
    fp32, bf16 = torch.tensor(losses["fp32"]), torch.tensor(losses["bf16"])
    assert (fp32[0] - fp32[-1]).abs() / fp32[0] > 0.2
    torch.testing.assert_close(bf16, fp32, rtol=5e-3, atol=0)


@pytest.mark.parametrize(
    ("capability", "dtype", "fused"),
    [((9, 0), torch.bfloat16, True), ((10, 0), torch.bfloat16, True), ((9, 0), torch.float32, False),
     ((8, 0), torch.bfloat16, False), ((8, 9), torch.float32, False)],
)  # fmt: skip
def test_grouped_mm_runs_only_where_torch_fuses_it(monkeypatch, capability, dtype, fused) -> None:
    """torch 2.11+ fuses grouped_mm for bf16 on sm90/sm100 only; elsewhere `auto` takes the per-expert loop
    with one line saying why, and `on` is refused in one line."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.version, "hip", None)
    cuda = torch.device("cuda", 0)
    layer, _ = _layer()
    line = choose_expert_path([layer.experts], "auto", cuda, dtype)
    assert layer.experts.use_grouped_mm == fused and (line == "") == fused
    if not fused:
        assert line.count("\n") == 0 and "one matmul per expert" in line
        assert f"sm{capability[0]}{capability[1]}" in line or "float32" in line
        with pytest.raises(ValueError, match=r"^moe.grouped_mm=on cannot run fused here: .*\(rule: use auto or off\)$"):
            choose_expert_path([_layer(grouped_mm="on")[0].experts], "on", cuda, dtype)


def test_cpu_keeps_grouped_mm_and_the_loop_reads_counts_once() -> None:
    """On CPU grouped_mm's offsets are host memory: it stays. The loop reads the counts once per layer, not
    once per matmul."""
    layer, x = _layer()
    assert choose_expert_path([layer.experts], "auto", torch.device("cpu"), torch.bfloat16) == ""
    assert layer.experts.use_grouped_mm
    layer, x = _layer(grouped_mm="off")
    with SyncCounter() as syncs:
        layer(x).square().sum().backward()
    assert [what for what, _ in syncs.calls] == ["Tensor.tolist"], syncs.calls


def test_dtype_auto_is_bf16_on_cuda_and_fp32_on_cpu() -> None:
    assert computes_in_bf16("auto", "cuda") and not computes_in_bf16("auto", "cpu")
    assert computes_in_bf16("bf16", "cpu") and not computes_in_bf16("fp32", "cuda")


def test_a_rank_with_one_visible_gpu_uses_it(monkeypatch) -> None:
    """Slurm's --gpus-per-task leaves each rank one GPU, cuda:0, whatever its LOCAL_RANK."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda") == torch.device("cuda", 0) and chosen == [0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert pick_device("cuda") == torch.device("cuda", 3) and chosen == [0, 3]


def test_the_gpu_kind_comes_from_the_driver_and_an_unknown_one_is_refused(tmp_path) -> None:
    gpu = tmp_path / "0000:01:00.0"
    gpu.mkdir()
    (gpu / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 42\n")
    assert gpu_names(tmp_path) == ["NVIDIA H100 80GB HBM3"]
    assert detect_kind(gpu_names(tmp_path)) == "h100" and detect_kind([]) == "cpu"
    with pytest.raises(ValueError, match=r"^cluster.gpu=auto found the GPU 'NVIDIA L40S'.*\(rule: set cluster.gpu"):
        detect_kind(["NVIDIA L40S"])


def test_the_preflight_never_initialises_cuda(monkeypatch) -> None:
    """The launching process plans a GPU job without touching torch.cuda (a context there would take GPU
    memory from the ranks); the GPU's kind comes from the driver's files."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pre-flight touched torch.cuda")

    for name in ("is_available", "device_count", "get_device_name", "get_device_properties", "_lazy_init"):
        monkeypatch.setattr(torch.cuda, name, refuse)
    cfg = compose([*TINY, "train.device=auto", "run.dir=unused"])
    assert preflight(cfg, 1) is None  # the driver's files name no GPU here: nothing to check against
    monkeypatch.setattr(planner_mod, "resolve_kind", lambda cluster: "h100")  # as where they name an H100
    assert preflight(cfg, 1) is None  # the tiny model fits
