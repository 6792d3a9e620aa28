"""`moeyard dashboard RUN_DIR`: a live page of a run's metrics and expert load, or a self-contained report.

The server is the standard library's. It keeps a compact index of the run (profiling/dashboard_index.py),
tailing RUN_DIR/metrics.jsonl and RUN_DIR/expert_load.jsonl from byte offsets, and the page polls it every
2 s for a summary whose size does not grow with the run (lines decimated, a layer x step heatmap bucketed)
and fetches the layer x expert heatmap of the one step it shows. Plots are plotly.js, served from the
plotly package (no network needed). `--export` writes one HTML file with plotly.js and the data inlined:
the same summary, and the heatmaps of at most EXPORT_MAX_CELLS cells' worth of logged steps, evenly spaced
and always the newest (a 61 x 256 run: 32 steps; a debug run: all of them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np
import plotly

from moeyard.profiling.dashboard_index import QUANTITIES, RunIndex

PAGE = Path(__file__).with_name("dashboard.html")
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
EXPORT_MAX_CELLS = 2_000_000  # numbers in the report's heatmaps: ~13 MB of JSON


def config_text(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    return path.read_text() if path.exists() else "(no config.yaml in the run directory)"


def export_data(run_dir: Path) -> dict[str, Any]:
    """The report's data: the summary and the heatmaps of evenly spaced logged steps, the newest included."""
    index = RunIndex(run_dir)
    while not index.refresh():
        pass
    summary = index.summary()
    count = summary["load"]["count"]
    per_step = max(1, len(summary["load"]["layers"]) * summary["load"].get("num_experts", 1) * len(QUANTITIES))
    keep = min(count, max(1, EXPORT_MAX_CELLS // per_step))
    chosen = np.unique(np.linspace(0, count - 1, keep).round().astype(int)).tolist() if count else []
    return {
        "summary": summary,
        "config": config_text(run_dir),
        "heatmaps": [index.heatmap(i, QUANTITIES) for i in chosen],
    }


def render_page(run_dir: Path, static: dict[str, Any] | None = None) -> str:
    """The page: served (plotly.js and data fetched) or static (both inlined)."""
    page = PAGE.read_text()
    if static is None:
        plotly_tag, data = '<script src="plotly.min.js"></script>', "null"
    else:
        plotly_tag = f"<script>{PLOTLY_JS.read_text()}</script>"
        data = json.dumps(static).replace("</", "<\\/")  # keep "</script>" in config text from closing the tag
    return page.replace("{{PLOTLY}}", plotly_tag).replace("{{DATA}}", data).replace("{{RUN}}", json.dumps(str(run_dir)))


class DashboardHandler(BaseHTTPRequestHandler):
    """GET /, /plotly.min.js, /api/summary?version=V, /api/heatmap?index=I&quantity=Q."""

    run_dir: Path
    index: RunIndex

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path in ("/", "/index.html"):
            self._send(render_page(self.run_dir).encode(), "text/html; charset=utf-8")
        elif url.path == "/plotly.min.js":
            self._send(PLOTLY_JS.read_bytes(), "application/javascript", cache=True)
        elif url.path == "/favicon.ico":
            self.send_response(HTTPStatus.NO_CONTENT)
            self.end_headers()
        elif url.path == "/api/summary":
            version = query.get("version", "-1")
            if version.lstrip("-").isdigit():
                self._send_json(self.summary(int(version)))
            else:
                self.send_error(HTTPStatus.BAD_REQUEST, f"version={version!r} is not an integer")
        elif url.path == "/api/heatmap":
            self.heatmap(query)
        else:
            self.send_error(HTTPStatus.NOT_FOUND)

    def summary(self, known: int) -> dict[str, Any]:
        """The summary, or only {version, unchanged, ...} when the page has this version or indexing goes on.

        While a backlog is indexed (a large run, a chunk per request) the page gets the progress and asks again
        at once, and draws once, at the end, instead of once per chunk.
        """
        done = self.index.refresh()
        head = {"version": self.index.version, "more": not done, "indexed": self.index.progress()}
        if not done or self.index.version == known:
            return {**head, "unchanged": True}
        return {**head, **self.index.summary(), "config": config_text(self.run_dir)}  # its own version

    def heatmap(self, query: dict[str, str]) -> None:
        quantity = query.get("quantity", "routed")
        if quantity not in QUANTITIES:
            self.send_error(HTTPStatus.BAD_REQUEST, f"quantity={quantity!r} is not one of {QUANTITIES}")
            return
        try:
            grid = self.index.heatmap(int(query.get("index", -1)), (quantity,))
        except (IndexError, ValueError, OSError) as err:  # a step not logged yet, or a file replaced meanwhile
            self.send_error(HTTPStatus.NOT_FOUND, str(err))
            return
        self._send_json({**grid, "quantity": quantity, "z": grid["z"][quantity]})

    def _send_json(self, obj: Any) -> None:
        self._send(json.dumps(obj).encode(), "application/json")

    def _send(self, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)

    def handle(self) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the browser closed the tab mid-response
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the page polls every two seconds."""


def make_server(run_dir: Path, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A dashboard server bound to host:port (port 0 = any free port; see server.server_address)."""
    handler = type("Handler", (DashboardHandler,), {"run_dir": run_dir, "index": RunIndex(run_dir)})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def cmd_dashboard(argv: list[str]) -> int:
    """`moeyard dashboard RUN_DIR [--port P] [--host H] [--export FILE]`."""
    parser = argparse.ArgumentParser(
        prog="moeyard dashboard",
        description="Live view of a run's metrics and expert load, or a self-contained HTML report.",
    )
    parser.add_argument("run_dir", type=Path, help="the run directory (holds metrics.jsonl)")
    parser.add_argument("--port", type=int, default=8050, help="port (0 = any free port); default 8050")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; default loopback only")
    parser.add_argument("--export", type=Path, metavar="FILE", help="write a self-contained HTML report and exit")
    args = parser.parse_args(argv)
    if not args.run_dir.is_dir():
        print(
            f"moeyard dashboard: run_dir={args.run_dir} is not a directory (rule: give a run directory)",
            file=sys.stderr,
        )
        return 2
    if args.export:
        args.export.write_text(render_page(args.run_dir, export_data(args.run_dir)))
        print(f"wrote {args.export}")
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"moeyard dashboard: warning: --host {args.host} exposes the run to the network", file=sys.stderr)
    try:
        server = make_server(args.run_dir, args.host, args.port)
    except OSError as err:  # port taken, or an address not of this machine
        print(
            f"moeyard dashboard: --port={args.port} on --host={args.host}: {err.strerror} "
            "(rule: a free port of this machine; --port 0 picks one)",
            file=sys.stderr,
        )
        return 2
    host, port = server.server_address[:2]
    print(f"moeyard dashboard: serving {args.run_dir} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
