"""`moeyard dashboard RUN_DIR`: a live page of a run's metrics and expert load, or a self-contained report.

The server is the standard library's; the page polls JSON endpoints that read RUN_DIR/metrics.jsonl and
RUN_DIR/expert_load.jsonl from a byte offset the page keeps, so each poll sends only the lines written
since the last one. Plots are plotly.js, served from the plotly package (no network needed). `--export`
writes one HTML file with plotly.js and all data inlined.
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

import plotly

PAGE = Path(__file__).with_name("dashboard.html")
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
FEEDS = {"metrics": "metrics.jsonl", "expert_load": "expert_load.jsonl"}
MAX_CHUNK = 4 << 20  # bytes per poll; the page asks again at once while `more` is true


def read_new_lines(path: Path, offset: int, limit: int = MAX_CHUNK) -> dict[str, Any]:
    """Complete JSON lines of `path` from byte `offset`: {rows, offset, reset, more}.

    A half-written last line stays for the next poll. A file shorter than `offset` was replaced (a new run
    in the same directory): reading restarts at 0 with reset=true so the page drops what it has.
    """
    size = path.stat().st_size if path.exists() else 0
    reset = offset > size
    offset = 0 if reset else offset
    if size == offset:
        return {"rows": [], "offset": offset, "reset": reset, "more": False}
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(limit)
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash; the lines after it are still good
    return {"rows": rows, "offset": offset + end, "reset": reset, "more": offset + end < size and end > 0}


def read_all(run_dir: Path) -> dict[str, Any]:
    """Every metrics and expert-load line plus the config text, for the static report."""
    data: dict[str, Any] = {}
    for feed, name in FEEDS.items():
        path = run_dir / name
        data[feed] = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    data["config"] = config_text(run_dir)
    return data


def config_text(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    return path.read_text() if path.exists() else "(no config.yaml in the run directory)"


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
    """GET /, /plotly.min.js, /api/config, /api/metrics?offset=N, /api/expert_load?offset=N."""

    run_dir: Path

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        url = urlparse(self.path)
        if url.path in ("/", "/index.html"):
            self._send(render_page(self.run_dir).encode(), "text/html; charset=utf-8")
        elif url.path == "/plotly.min.js":
            self._send(PLOTLY_JS.read_bytes(), "application/javascript", cache=True)
        elif url.path == "/favicon.ico":
            self.send_response(HTTPStatus.NO_CONTENT)
            self.end_headers()
        elif url.path == "/api/config":
            self._send_json({"text": config_text(self.run_dir)})
        elif url.path.startswith("/api/") and url.path[5:] in FEEDS:
            offset = int(parse_qs(url.query).get("offset", ["0"])[0])
            self._send_json(read_new_lines(self.run_dir / FEEDS[url.path[5:]], offset))
        else:
            self.send_error(HTTPStatus.NOT_FOUND)

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
    handler = type("Handler", (DashboardHandler,), {"run_dir": run_dir})
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
        args.export.write_text(render_page(args.run_dir, read_all(args.run_dir)))
        print(f"wrote {args.export}")
        return 0
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"moeyard dashboard: warning: --host {args.host} exposes the run to the network", file=sys.stderr)
    server = make_server(args.run_dir, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"moeyard dashboard: serving {args.run_dir} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
