"""Smoke test of the benchmark scripts: each runs in its tiny `--quick` mode and prints its ratio table.

Timings are not checked (the machine is shared); what is checked is that every row of the table is printed
with a positive time and ratio, and that each baseline row has ratio 1.00, so the scripts keep working as
the code under them changes.

`gpu_check.py` runs at tiny shapes on CPU with Hydra and OmegaConf made unimportable (the GPU machine has
neither): the real Trainer trains each run (one compiled under activation checkpointing, with no graph break),
every first-contact check passes (pp2 on two gloo ranks included), and `moeyard plan --calibration` reads its
JSON report.

Run: .venv/bin/pytest -q tests/multiproc/test_benchmarks.py
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moeyard.plan.planner import load_calibration

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?"


def run_quick(script: str, timeout: float, *options: str) -> str:
    """Runs `python benchmarks/SCRIPT --quick [OPTIONS]` from the repo root; returns its stdout."""
    env = {
        **os.environ,
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", *options],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} --quick failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def ratio_rows(stdout: str, names: list[str], trailing: int = 0) -> dict[str, tuple[float, ...]]:
    """(time or rate, ratio, then the `trailing` columns after the ratio) of each named row: the last
    2 + trailing numbers on the first line holding the name."""
    rows = {}
    for name in names:
        line = next((ln for ln in stdout.splitlines() if re.search(rf"(^|  ){re.escape(name)}  ", ln)), None)
        assert line, f"row {name!r} missing from:\n{stdout}"
        numbers = re.findall(NUMBER, line.split(name, 1)[1])
        rows[name] = tuple(float(n) for n in numbers[-2 - trailing :])
    return rows


@pytest.mark.timeout(300)
def test_moe_layer_benchmark_prints_ratios_to_the_floor() -> None:
    out = run_quick("moe_layer.py", 280, "--compile")  # the compiled row too: its first step compiles
    assert "x floor" in out and "deepspeed MoE skipped" not in out and "transformers skipped" not in out
    names = ["floor (grouped_mm)", "ours grouped_mm", "ours looped", "ours compiled", "deepspeed MoE"]
    rows = ratio_rows(out, [*names, "transformers grouped_mm", "transformers eager"], trailing=1)
    assert rows["floor (grouped_mm)"][1] == 1.0
    assert all(ms > 0 and ratio > 0 for ms, ratio, _ in rows.values())
    # On CPU the last column is each variant's median minor page faults per step: a count, never negative.
    assert all(faults >= 0 and faults == int(faults) for *_, faults in rows.values())


@pytest.mark.timeout(120)
def test_layer_profile_charges_time_to_phases() -> None:
    out = run_quick("profile_layer.py", timeout=110)
    assert "not found in moe/" not in out, out  # benchmarks/profile_layer.py PHASES must follow moe/ renames
    phases = {line[:42].strip() for line in out.splitlines()}
    assert {"experts: grouped_mm", "router (linear, scores, top-k weights)", "gather rows (index_select)"} <= phases


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_layouts_benchmark_prints_ratios_to_one_process() -> None:
    out = run_quick("layouts.py", timeout=280)
    assert "tokens/s" in out and "x single" in out
    rows = ratio_rows(out, ["single", "ep2"])
    assert rows["single"][1] == 1.0
    assert all(tps > 0 and ratio > 0 for tps, ratio in rows.values())


NO_HYDRA_RUN = """
import runpy, sys
sys.modules.update(hydra=None, omegaconf=None)  # `import hydra` now raises ImportError
sys.path[:0] = ["benchmarks", "."]
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


@pytest.mark.multiproc
@pytest.mark.timeout(300)
def test_gpu_check_runs_on_cpu_without_hydra(tmp_path: Path) -> None:
    report_path = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, "-c", NO_HYDRA_RUN, "--quick", "--device", "cpu", "--out", str(report_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, f"gpu_check.py --quick failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert "MFU" in proc.stdout and "x floor" in proc.stdout, proc.stdout
    report = json.loads(report_path.read_text())
    assert report["transformers_skipped"] is None

    # the real Trainer's runs: eager, compiled under full activation checkpointing, and the Mixtral-width cut
    runs = [(m["model"], m["compile"], m["activation_checkpoint"]) for m in report["models"]]
    assert runs == [("debug", False, "none"), ("debug", True, "full"), ("mixtral_8x7b_2blocks_small", False, "none")]
    for m in report["models"]:
        assert m["tokens_per_s"] > 0 and m["tflops"] > 0 and m["mfu"] > 0, m
        assert all(math.isfinite(loss) for loss in m["losses"].values()) and len(m["losses"]) >= 2, m
        assert m["model_config"]["name"] == m["model"] and m["moe_config"]["num_experts"] > 0, m
        assert m["predicted_peak"]["total_gb"] > 0, m  # the planner's prediction of the same job
    compiled = report["models"][1]["compiled"]
    assert compiled["graphs"] >= 1 and compiled["graph_breaks"] == 0, compiled

    checks = {(c["check"], c["case"]): c for c in report["checks"]}
    assert {check for check, _ in checks} == {"pipeline", "grouped_mm", "h2d copy", "attention"}, checks.keys()
    assert all(c["status"] in ("ok", "info") for c in checks.values()), checks
    pp2 = checks[("pipeline", "pp2 bf16, 2 CPU ranks")]
    assert len(pp2["losses"]) == len(pp2["single"]) == 3, pp2

    assert [layer["shape"]["router"] for layer in report["layers"]] == ["softmax_topk", "sigmoid_topk"]
    for layer in report["layers"]:
        rows = {row["variant"]: row for row in layer["variants"]}
        assert {"floor (grouped_mm)", "ours grouped_mm", "transformers grouped_mm"} <= rows.keys(), rows
        assert rows["floor (grouped_mm)"]["x_floor"] == 1.0
        assert all(row["ms"] > 0 and row["expert_tflops"] > 0 for row in rows.values()), rows
        shape = layer["shape"]
        assert layer["tokens_per_expert"]["mean"] == shape["tokens"] * shape["top_k"] / shape["experts"]

    # `moeyard plan --calibration` reads the file as written
    cal, _ = load_calibration(report_path, "h100")
    assert cal.source == str(report_path)
