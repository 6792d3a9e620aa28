"""The dashboard: the run index and its bounded views, both on-disk forms of the load, and the page in a real
headless browser, on a trained run and on a synthetic one at DeepSeek-V3 scale.

The live test trains a short real run with `moeyard train`, starts `moeyard dashboard RUN_DIR --port 0`,
opens the page in Debian's chromium (driven by playwright), reads the plotly figures back from the page and
asserts the heatmap has one row per MoE layer and one column per expert; then it trains again into the same
run directory while the page is open and waits for the page to show the new steps. The exported report is
opened from a file:// URL, so it must render with no server at all.
The scale test writes 61 layers x 256 experts x 5,000 logged steps in the compact form with numpy
(tests/browser/synthetic_run.py) and holds the page to stated bounds; see its docstring.
Needs /usr/bin/chromium (`make system-deps`). Run: .venv/bin/pytest -q tests/browser/test_dashboard.py
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch

from moeyard.job.compose import compose
from moeyard.profiling.dashboard import EXPORT_MAX_CELLS, export_data, make_server, render_page
from moeyard.profiling.dashboard_index import MAX_COLUMNS, MAX_POINTS, RunIndex, decimate, read_lines, round_sig
from moeyard.profiling.expert_load import ExpertLoadTracker
from tests.browser import synthetic_run
from tests.helpers import MOEYARD

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TRAIN = [
    "train", "model=debug", "train.eval_every=0", "train.log_every=1", "profiling.progress=false",
    "data.max_files=40",
]  # fmt: skip
HEATMAP_SHAPE = "(() => { const z = document.getElementById('heatmap').data[0].z; return [z.length, z[0].length]; })()"
SLIDER_MAX = "Number(document.getElementById('step-slider').max)"
STEP_LABEL = "document.getElementById('step-label').textContent.startsWith('step {} ')"


def test_read_lines_is_incremental_and_holds_back_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step"')
    lines, offset, reset, more = read_lines(path, 0)
    assert lines == [(0, b'{"step": 1}'), (12, b'{"step": 2}')] and not reset
    assert offset == len('{"step": 1}\n{"step": 2}\n') and more  # the partial line is still to come
    with path.open("a") as f:
        f.write(": 3}\n")
    lines, offset, _, more = read_lines(path, offset)
    assert lines == [(24, b'{"step": 3}')] and not more
    assert read_lines(path, offset)[0] == []
    path.write_text('{"step": 1}\n')  # a new run replaced the file
    lines, _, reset, _ = read_lines(path, offset)
    assert reset and lines == [(0, b'{"step": 1}')]
    assert read_lines(tmp_path / "missing.jsonl", 0) == ([], 0, False, False)
    path.write_text("x" * 100 + "\n" + "y" * 10 + "\n")  # a line longer than the read limit comes whole
    assert [len(x) for _, x in read_lines(path, 0, limit=16)[0]] == [100, 10]


def test_decimate_bounds_points_and_keeps_spikes() -> None:
    x = np.arange(10_000)
    y = np.ones(10_000)
    y[4321], y[777] = 50.0, -3.0
    out = decimate(x, y, max_points=100)
    assert len(out["x"]) <= 100 and out["x"] == sorted(out["x"])
    assert {(4321, 50.0), (777, -3.0)} <= set(zip(out["x"], out["y"], strict=True))
    short = decimate(np.array([1, 2, 3]), np.array([1.0, np.nan, 2.0]))
    assert short == {"x": [1, 3], "y": [1.0, 2.0]}  # JSON has no NaN: a gap instead
    assert round_sig(np.array([3.14159265, 1234567.89, 0.000123456789, 0.0])).tolist() == [
        3.14159,
        1234570.0,
        0.000123457,
        0.0,
    ]


def one_forward(routed: list[int], kept: list[int]) -> dict[str, list[dict[str, torch.Tensor]]]:
    return {
        "0": [
            {
                "routed": torch.tensor(routed),
                "kept": torch.tensor(kept),
                "mean_prob": torch.tensor([0.4, 0.1, 0.3, 0.2]),
                "received": torch.tensor(sum(kept)),
                "entropy": torch.tensor(1.0),
            }
        ]
    }


def test_compact_and_inline_forms_show_the_same_load(tmp_path: Path) -> None:
    cfg = compose(["model=debug", "model.n_layers=1", "moe.num_experts=4", "moe.bias_update_rate=0.01"])
    for compact in (False, True):
        run_dir = tmp_path / f"compact_{compact}"
        tracker = ExpertLoadTracker(
            cfg.model, cfg.moe, torch.device("cpu"), 1, 0, run_dir, dead_steps=5, imbalance_warn=9.0, compact=compact
        )
        for step in (1, 2):
            tracker.record(step, one_forward([8, 0, 4 * step, 4], [6, 0, 4, 4]), {"0": torch.tensor([0.5, 0, 0, -1])})
        tracker.close()
    inline = [json.loads(x) for x in (tmp_path / "compact_False/expert_load.jsonl").read_text().splitlines()]
    compact = [json.loads(x) for x in (tmp_path / "compact_True/expert_load.jsonl").read_text().splitlines()]
    assert inline[1]["layers"]["0"]["routed"] == [8, 0, 8, 4] and "arrays" not in inline[1]
    assert "routed" not in compact[1]["layers"]["0"] and compact[1]["arrays"]["codec"] == "shuffle-zlib"
    assert compact[1]["layers"]["0"]["imbalance"] == inline[1]["layers"]["0"]["imbalance"] == 8 / 5
    assert not (tmp_path / "compact_False/expert_load.bin").exists()
    grids = []
    for form in ("compact_False", "compact_True"):
        index = RunIndex(tmp_path / form)
        assert index.refresh()
        grids.append(index.heatmap(1, ("routed", "dropped", "mean_prob", "bias")))
    assert grids[0] == grids[1]  # float32 in the blob, 6 decimals inline: both print as the same short numbers
    assert grids[1]["z"] == {
        "routed": [[8, 0, 8, 4]],
        "dropped": [[2, 0, 4, 0]],
        "mean_prob": [[0.4, 0.1, 0.3, 0.2]],
        "bias": [[0.5, 0.0, 0.0, -1.0]],
    }
    assert grids[1]["step"] == 2 and grids[1]["count"] == 2


def test_dashboard_rejects_a_missing_run_dir(moeyard, tmp_path: Path) -> None:
    result = moeyard("dashboard", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert f"run_dir={tmp_path / 'nope'} is not a directory" in result.stderr


def launch_browser(p):
    return p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)


@pytest.mark.timeout(300)
def test_live_dashboard_in_headless_chromium(moeyard, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    run_dir = tmp_path / "run"
    first = moeyard(*TRAIN, "train.steps=3", f"run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    server = subprocess.Popen(
        [str(MOEYARD), "dashboard", str(run_dir), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        banner = server.stdout.readline()
        assert banner.startswith(f"moeyard dashboard: serving {run_dir} at http://127.0.0.1:")
        url = banner.split(" at ")[1].split()[0]
        with sync_playwright() as p:
            browser = launch_browser(p)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)
            page.wait_for_function(f"{SLIDER_MAX} === 2 && {STEP_LABEL.format(3)}", timeout=60_000)  # 3 logged
            assert page.evaluate(HEATMAP_SHAPE) == [4, 8]  # model=debug: 4 MoE layers x 8 experts
            assert page.evaluate("document.getElementById('imbalance').data.length") == 4  # a line per layer
            assert page.evaluate("document.getElementById('losses').data[0].x") == [1, 2, 3]
            assert "num_experts: 8" in page.inner_text("#config")

            # Train again into the same run directory while the page is open: it must pick up the new lines.
            # A used run.dir takes train.resume=auto; with no checkpoint saved (3 steps) the run starts over and
            # cuts metrics.jsonl back to step 0, so the page shows the new run's 6 steps once each.
            second = subprocess.Popen(
                [str(MOEYARD), *TRAIN, "train.steps=6", "train.resume=auto", f"run.dir={run_dir}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            page.wait_for_function(f"{SLIDER_MAX} === 5", timeout=180_000)
            assert second.wait(timeout=120) == 0, second.stderr.read()
            assert page.evaluate(HEATMAP_SHAPE) == [4, 8]
            assert page.inner_text("#step-label").startswith("step 6 ")
            assert page.evaluate("document.getElementById('throughput').data[0].x.length") == 6
            assert errors == []
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)

    # The exported report renders from a file:// URL: plotly.js and the data are inside the file.
    report = tmp_path / "report.html"
    exported = moeyard("dashboard", str(run_dir), "--export", str(report))
    assert exported.returncode == 0, exported.stderr
    html = report.read_text()
    assert re.search(r"<script[^>]*\ssrc=", html) is None  # plotly.js is inlined, not fetched
    with sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page()
        page.goto(report.as_uri())
        page.wait_for_function(f"{SLIDER_MAX} === 5", timeout=30_000)
        assert page.evaluate(HEATMAP_SHAPE) == [4, 8]
        browser.close()
    lines = [json.loads(x) for x in (run_dir / "expert_load.jsonl").read_text().splitlines()]
    assert len(lines) == 3 + 6  # both runs' lines are kept in the file; the page keys them by step


# Bounds of the scale test, measured on the 2-core CI CPU (shared with other jobs) with a 2x-or-more margin; the
# page that kept every line fails the load, heap and response bounds by far (at 300 logged steps: 18 s, 135 MB).
LOAD_BOUND_S = 30.0  # measured 9.5-13 s: indexing 5,000 lines (~3 s), plotting, the newest step's grid
UPDATE_BOUND_S = 10.0  # measured 2.3-2.7 s: the page polls every 2 s
HEAP_BOUND_MB = 64  # measured 13-14 MB after GC
RESPONSE_BOUND_KB = 1024  # measured: summary 265 KB, a grid 62 KB here (a real run's float32 mean_prob: 202 KB)
EXPORT_BOUND_MB = 40  # measured 17.6 MB: 32 steps' grids of 4 quantities, the summary, plotly.js (4.8 MB)


def js_heap_mb(page) -> float:
    cdp = page.context.new_cdp_session(page)
    cdp.send("HeapProfiler.collectGarbage")
    return cdp.send("Runtime.getHeapUsage")["usedSize"] / 2**20


def set_slider(page, index: int) -> None:
    page.evaluate(
        f"(() => {{ const s = document.getElementById('step-slider'); s.value = {index};"
        " s.dispatchEvent(new Event('input')); })()"
    )


@pytest.mark.timeout(300)
def test_dashboard_at_deepseek_v3_scale(tmp_path: Path) -> None:
    """61 layers x 256 experts x 5,000 logged steps (compact form), on 2 cores: the page loads in under 30 s,
    shows 10 appended steps within 10 s, keeps its JS heap (after GC) under 64 MB, and no API response passes
    1 MB; its lines hold MAX_POINTS points and its step heatmap MAX_COLUMNS columns; moving the slider fetches
    that step's grid, equal to what was written. The report of the same run holds EXPORT_MAX_CELLS numbers of
    grids and stays under 40 MB. Measured values are next to the bounds above; the test takes ~30 s.
    """
    from playwright.sync_api import sync_playwright

    run_dir = tmp_path / "v3"
    pool = synthetic_run.make_pool()
    synthetic_run.write_steps(run_dir, 1, 5000, pool)
    server = make_server(run_dir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sizes: dict[str, list[int]] = {}

    def on_response(response) -> None:
        path = urlparse(response.url).path
        if path.startswith("/api/"):
            sizes.setdefault(path, []).append(int(response.headers.get("content-length", "0")))

    try:
        with sync_playwright() as p:
            browser = launch_browser(p)
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.on("response", on_response)
            start = time.monotonic()
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_function(
                f"{STEP_LABEL.format(5000)} && document.getElementById('heat-steps').data", timeout=120_000
            )
            loaded = time.monotonic() - start
            assert loaded < LOAD_BOUND_S, f"the page took {loaded:.1f} s to load"
            assert page.evaluate(HEATMAP_SHAPE) == [synthetic_run.LAYERS, synthetic_run.EXPERTS]
            heat = "document.getElementById('heat-steps').data[0].z"
            assert page.evaluate(f"[{heat}.length, {heat}[0].length]") == [synthetic_run.LAYERS, MAX_COLUMNS]
            traces = page.evaluate("document.getElementById('imbalance').data.map((t) => [t.name, t.x.length])")
            assert traces == [["max over layers", MAX_POINTS], ["mean over layers", MAX_POINTS]]
            assert page.evaluate("document.getElementById('losses').data[0].x.length") == MAX_POINTS
            heap_loaded = js_heap_mb(page)

            synthetic_run.write_steps(run_dir, 5001, 5010, pool)  # the run goes on while the page is open
            start = time.monotonic()
            page.wait_for_function(f"{SLIDER_MAX} === 5009 && {STEP_LABEL.format(5010)}", timeout=60_000)
            updated = time.monotonic() - start
            assert updated < UPDATE_BOUND_S, f"the page took {updated:.1f} s to show the new steps"

            set_slider(page, 1234)  # the 1,235th logged step is step 1235
            page.wait_for_function(STEP_LABEL.format(1235))
            shown = page.evaluate("document.getElementById('heatmap').data[0].z")
            assert shown == pool.routed(1235).tolist()
            heap = max(heap_loaded, js_heap_mb(page))
            assert heap < HEAP_BOUND_MB, f"the page's JS heap is {heap:.0f} MB"
            assert errors == []
            browser.close()
        largest = {path: max(kb) / 1024 for path, kb in sizes.items()}
        assert largest.keys() == {"/api/summary", "/api/heatmap"}
        assert max(largest.values()) < RESPONSE_BOUND_KB, largest

        report = export_data(run_dir)
        per_step = synthetic_run.LAYERS * synthetic_run.EXPERTS * 4
        assert len(report["heatmaps"]) == EXPORT_MAX_CELLS // per_step
        assert report["heatmaps"][0]["step"] == 1 and report["heatmaps"][-1]["step"] == 5010
        html_mb = len(render_page(run_dir, report)) / 2**20
        assert html_mb < EXPORT_BOUND_MB, f"the report is {html_mb:.0f} MB"
        print(
            f"\nscale: load {loaded:.1f} s, update {updated:.1f} s, heap {heap:.0f} MB, responses KB {largest},"
            f" report {html_mb:.1f} MB"
        )
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(run_dir)  # ~190 MB; pytest keeps the last runs' temp directories
