"""A CPU rank's rates, measured once, and the one-off calibration of the time model to the real trainer.

Rates (`cpu_rates`, cached per CPU model and torch version in profiling/devices.py's one locked cache): the
fp32 GEMM rate of one torch thread, the bandwidth of a large copy, and gloo over loopback between two spawned
ranks, kind by kind (4 MB all_reduce, all_gather, reduce_scatter, all_to_all and send; a 4-byte all_reduce
for latency): gloo's all_gather and reduce_scatter run several times slower per byte than its all_reduce.

Calibration (`calibrate`): the real trainer runs a few calibration jobs, and one scale on the compute
efficiencies (gemm_eff, attn_eff and mem_eff together) and the fixed costs (per block, and what tensor and
expert parallelism, FSDP and pipelining add per block or stage) are fitted by non-negative least squares so
that the time model's predictions of those jobs match their median step times. The time model is linear in
these parameters on a CPU, so each job's prediction is written exactly as coefficients times parameters.
The time validation (benchmarks/plan_cpu.py) fits on other jobs than it predicts: a smaller model for
the per-feature costs, other micro-batch counts for the one-process ones.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from moeyard.parallel.compat import all_gather_into, reduce_scatter_into
from moeyard.plan.calibration import Calibration
from moeyard.profiling.devices import DeviceSpec, cached, cpu_key, measure_cpu_tflops
from moeyard.train.spawn import spawn_ranks


def _measure_copy_gbps(n: int = 16 * 2**20, reps: int = 7) -> float:
    a = torch.empty(n)
    b = torch.empty(n)
    b.copy_(a)
    best = min(_timed(lambda: b.copy_(a)) for _ in range(reps))
    return 2 * 4 * n / best / 1e9  # read + write


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gloo_rank(rank: int, out: str) -> None:
    """Times each kind of collective between two ranks; rank 0 writes their bus bandwidths (ring shares:
    all_reduce moves the buffer once per rank at two ranks, all_gather and reduce_scatter half the whole
    buffer, all_to_all half its input, a send all of it) and the latency of a 4-byte all_reduce."""
    dist.init_process_group("gloo")
    n = 2**20  # 4 MB of fp32 per rank
    x, whole = torch.zeros(n), torch.zeros(2 * n)
    peer = 1 - rank
    ops = {
        "all_reduce": (lambda: dist.all_reduce(x), n),
        "all_gather": (lambda: all_gather_into(whole, x), n),
        "reduce_scatter": (lambda: reduce_scatter_into(x, whole), n),
        "all_to_all": (lambda: dist.all_to_all_single(torch.empty(n), x), n // 2),
        "send": (lambda: dist.send(x, peer) if rank == 0 else dist.recv(x, peer), n),
    }
    small = torch.zeros(1)
    dist.all_reduce(small)
    latency = statistics.median(_timed(lambda: dist.all_reduce(small)) for _ in range(20))
    rates = {}
    for name, (op, moved) in ops.items():
        op()
        # The fastest of several: on a shared machine noise only ever adds time, and one slow moment taken
        # as the link's rate would skew every prediction of the run that measured it.
        seconds = min(_timed(op) for _ in range(7))
        rates[name] = moved * 4 / max(seconds - latency, 1e-9) / 1e9
    if rank == 0:
        Path(out).write_text(json.dumps({"latency_s": latency, "collective_gbps": rates}))
    dist.barrier()
    dist.destroy_process_group()


def measure_rates() -> dict[str, float]:
    """This CPU's single-thread GEMM rate, copy bandwidth and two-rank gloo loopback (module docstring)."""
    import tempfile

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak = max(measure_cpu_tflops(n=512, reps=6) for _ in range(2))
        copy = _measure_copy_gbps()
    finally:
        torch.set_num_threads(before)
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_gloo_rank, (f"{tmp}/gloo.json",), 2, timeout_s=120, what="gloo loopback measurement")
        gloo = json.loads(Path(f"{tmp}/gloo.json").read_text())
    return {"peak_tflops": peak, "hbm_gbps": copy, "link_gbps": gloo["collective_gbps"]["all_reduce"], **gloo}


def cpu_rates() -> dict[str, float]:
    """`measure_rates`, measured once per CPU (one torch thread) and torch build, and cached."""
    return cached("plan_cpu.json", cpu_key(threads=1) + "|plan=4", measure_rates)


PARAMS = ("scale", "layer_s", "tp_layer_s", "sp_layer_s", "ep_layer_s", "fsdp_layer_s", "pp_micro_s", "step_s")
"""What the calibration fits: a scale on the compute time (the three efficiencies divided by it) and the
fixed costs."""


def nnls(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Non-negative least squares by trying every subset of columns (there are eight)."""
    n = x.shape[1]
    best, best_err = [0.0] * n, float(y.pow(2).sum())
    for mask in range(1, 2**n):
        cols = [j for j in range(n) if mask >> j & 1 and x[:, j].abs().sum() > 0]
        if len(cols) != bin(mask).count("1"):
            continue
        sol = torch.linalg.lstsq(x[:, cols], y.unsqueeze(1)).solution.squeeze(1)
        if (sol < 0).any():
            continue
        err = float((x[:, cols] @ sol - y).pow(2).sum())
        if err < best_err:
            best_err, best = err, [0.0] * n
            for j, v in zip(cols, sol.tolist(), strict=True):
                best[j] = v
    return best


def features(planner, layout) -> tuple[list[float], float]:
    """The prediction of `layout` as a linear function of PARAMS: (coefficients, constant). Exact, because
    the time model is linear in them on a CPU (no overlap): it is evaluated at zero and at each unit."""
    base = planner.cal
    zero = replace(base, gemm_eff=1e12, attn_eff=1e12, mem_eff=1e12, layer_s=0.0, step_s=0.0)
    zero = replace(zero, tp_layer_s=0.0, sp_layer_s=0.0, ep_layer_s=0.0, fsdp_layer_s=0.0, pp_micro_s=0.0)
    units = [replace(zero, gemm_eff=base.gemm_eff, attn_eff=base.attn_eff, mem_eff=base.mem_eff)]
    units += [replace(zero, **{name: 1.0}) for name in PARAMS[1:]]
    totals = []
    for cal in [zero, *units]:
        planner.cal = cal
        totals.append(planner.predict(layout).time.total)
    planner.cal = base
    return [t - totals[0] for t in totals[1:]], totals[0]


def calibrate(planners: list, runs: list[tuple[object, float]]) -> Calibration:
    """Fits one calibration to measured runs, (Layout, median step seconds) pairs, each predicted by the
    planner of its job (same device and calibration); returns it, installed in every planner."""
    rows, consts = [], []
    for planner, (layout, _) in zip(planners, runs, strict=True):
        coefficients, const = features(planner, layout)
        rows.append(coefficients)
        consts.append(const)
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor([t - c for (_, t), c in zip(runs, consts, strict=True)], dtype=torch.float64)
    fitted = dict(zip(PARAMS, nnls(x, y), strict=True))
    scale = fitted.pop("scale") or 1.0
    base = planners[0].cal
    cal = replace(
        base,
        gemm_eff=base.gemm_eff / scale,
        attn_eff=base.attn_eff / scale,
        mem_eff=base.mem_eff / scale,
        **fitted,
        source=f"fitted to {len(runs)} CPU runs",
    )
    for planner in planners:
        planner.cal = cal
    return cal


def profile_json(device: DeviceSpec, cal: Calibration) -> dict:
    """The JSON `--calibration` reads for cluster.gpu=cpu."""
    return {"kind": "cpu", "device": asdict(device), "calibration": cal.to_json()}
