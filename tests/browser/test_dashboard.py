"""The dashboard: incremental JSONL reading, the static report, and the live page in a real headless browser.

The browser test trains a short real run with `moeyard train`, starts `moeyard dashboard RUN_DIR --port 0`,
opens the page in Debian's chromium (driven by playwright), reads the plotly figures back from the page and
asserts the heatmap has one row per MoE layer and one column per expert; then it trains again into the same
run directory while the page is open and waits for the page to show the new steps. The exported report is
opened from a file:// URL, so it must render with no server at all.
Needs /usr/bin/chromium (`make system-deps`). Run: .venv/bin/pytest -q tests/browser/test_dashboard.py
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from profiling.dashboard import read_new_lines
from tests.helpers import MOEYARD

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TRAIN = ["train", "model=debug", "train.eval_every=0", "profiling.progress=false", "data.max_files=40"]
HEATMAP_SHAPE = "(() => { const z = document.getElementById('heatmap').data[0].z; return [z.length, z[0].length]; })()"
SLIDER_MAX = "Number(document.getElementById('step-slider').max)"


def test_read_new_lines_is_incremental_and_holds_back_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step"')
    first = read_new_lines(path, 0)
    assert [r["step"] for r in first["rows"]] == [1, 2] and not first["reset"]
    assert first["offset"] == len('{"step": 1}\n{"step": 2}\n')
    with path.open("a") as f:
        f.write(": 3}\n")
    second = read_new_lines(path, first["offset"])
    assert [r["step"] for r in second["rows"]] == [3]
    assert read_new_lines(path, second["offset"])["rows"] == []
    path.write_text('{"step": 1}\n')  # a new run replaced the file
    again = read_new_lines(path, second["offset"])
    assert again["reset"] and [r["step"] for r in again["rows"]] == [1]
    assert read_new_lines(tmp_path / "missing.jsonl", 0) == {"rows": [], "offset": 0, "reset": False, "more": False}


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
            page.wait_for_function(f"{SLIDER_MAX} === 2", timeout=60_000)  # 3 logged steps
            assert page.evaluate(HEATMAP_SHAPE) == [4, 8]  # model=debug: 4 MoE layers x 8 experts
            assert page.evaluate("document.getElementById('imbalance').data.length") == 4  # a line per layer
            assert page.evaluate("document.getElementById('losses').data[0].x") == [1, 2, 3]
            assert "num_experts: 8" in page.inner_text("#config")

            # Train again into the same run directory while the page is open: it must pick up the new lines.
            second = subprocess.Popen(
                [str(MOEYARD), *TRAIN, "train.steps=6", f"run.dir={run_dir}"],
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
