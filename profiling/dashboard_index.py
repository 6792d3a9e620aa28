"""What the dashboard server keeps of a run, and the bounded views of it that it sends the page.

The page must not hold steps x layers x experts: at 61 layers x 256 experts and 5,000 logged steps that is
78M numbers, and the page that kept every line measured ~0.4 MB of JS heap per logged step. So the server
tails RUN_DIR/metrics.jsonl and RUN_DIR/expert_load.jsonl from byte offsets and keeps, per logged step, only
what the plots need (the metrics scalars; per layer, imbalance and drop rate) and where the step's
per-expert arrays are (the byte range of an inline line, or the compact line's blob in expert_load.bin; see
profiling/expert_load.py). The page gets
- a summary whose size does not grow with the run: each line decimated to at most MAX_POINTS points (the
  min and max of each bucket of steps, so a loss spike survives), the sampled step breakdown averaged into at
  most MAX_BARS buckets, and a layer x step imbalance heatmap of at most MAX_COLUMNS columns (the max of each
  bucket, so a bad step shows);
- the layer x expert heatmap of one logged step, when it asks for that step.

A resumed run logs the steps after its checkpoint again. It cuts metrics.jsonl back to the checkpoint's step
by writing a new file (train/checkpointing.py), which the index notices as another inode and reads afresh;
and in any file, a step at or below one read before starts over from there: the index keeps each step once,
as the run that continued logged it.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeyard.profiling.load_format import read_blob

FEEDS = {"metrics": "metrics.jsonl", "expert_load": "expert_load.jsonl"}
SERIES = ("loss", "eval_loss", "aux_loss", "z_loss", "tokens_per_s", "mfu")
QUANTITIES = ("routed", "dropped", "mean_prob", "bias")
MAX_POINTS = 1000  # per line: more than a plot 1,000 px wide can show
MAX_BARS = 200
MAX_COLUMNS = 400
LINES_MAX_LAYERS = 16  # above this, one line per layer is unreadable: max and mean over layers, plus the heatmap
WARNINGS_SHOWN = 6
INDEX_CHUNK = 8 << 20  # bytes one refresh reads per file: a request returns in about a second on 2 cores


def read_lines(path: Path, offset: int, limit: int = INDEX_CHUNK) -> tuple[list[tuple[int, bytes]], int, bool, bool]:
    """Complete lines of `path` from byte `offset`: ([(byte offset, line)], new offset, reset, more).

    A half-written last line stays for the next call. A file shorter than `offset` was replaced (a new run in
    the same directory): reading restarts at 0 with reset=True. A line longer than `limit` is read whole.
    """
    size = path.stat().st_size if path.exists() else 0
    reset = offset > size
    offset = 0 if reset else offset
    if size == offset:
        return [], offset, reset, False
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read(limit)
        while b"\n" not in data and (chunk := f.read(limit)):
            data += chunk
    end = data.rfind(b"\n") + 1
    lines, pos = [], offset
    for line in data[:end].split(b"\n")[:-1]:
        lines.append((pos, line))
        pos += len(line) + 1
    return lines, offset + end, reset, end > 0 and offset + end < size


def bucket_edges(n: int, buckets: int) -> np.ndarray:
    """Edges of at most `buckets` contiguous, near-equal buckets over range(n)."""
    return np.unique(np.linspace(0, n, min(n, buckets) + 1).round().astype(np.int64))


def decimate(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> dict[str, list]:
    """{x, y} with at most `max_points` of the finite points: each bucket's min and max, in x order."""
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) > max_points:
        edges = bucket_edges(len(x), max_points // 2)
        buckets = list(zip(edges[:-1], edges[1:], strict=True))
        idx = sorted({int(a + y[a:b].argmin()) for a, b in buckets} | {int(a + y[a:b].argmax()) for a, b in buckets})
        x, y = x[idx], y[idx]
    return {"x": x.tolist(), "y": jsonable(round_sig(y))}


def round_sig(a: np.ndarray, digits: int = 6) -> np.ndarray:
    """`a` to `digits` significant digits: all a plot or its hover shows, at under half the JSON bytes."""
    a = np.asarray(a, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.floor(np.log10(np.abs(a)))
    mag = np.where(np.isfinite(mag), mag, 0)
    up, down = 10.0 ** np.maximum(digits - 1 - mag, 0), 10.0 ** np.maximum(mag - digits + 1, 0)
    # Divide a rounded integer by an exact power of ten (or multiply by one): the result prints short.
    return np.round(a * up / down) / up * down


def jsonable(a: np.ndarray) -> list:
    """Nested lists with NaN/inf as null (JSON has no NaN; the browser's JSON.parse rejects it)."""
    a = np.asarray(a, dtype=np.float64)
    if np.isfinite(a).all():
        return a.tolist()
    return np.where(np.isfinite(a), a, None).tolist()


@contextlib.contextmanager
def all_nan_ok():
    """nanmean/nanmax warn on an all-NaN slice; here that is a gap (no value of a key in a bucket), not an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


@dataclass
class LoadStep:
    """One logged step of expert_load.jsonl as the server keeps it."""

    step: int
    lids: tuple[str, ...]
    num_experts: int
    imbalance: np.ndarray  # [L] float32
    drop_rate: np.ndarray  # [L] float32
    where: dict[str, Any] | tuple[int, int]  # a compact line's "arrays", or (offset, length) of an inline line
    warnings: list[str] = field(default_factory=list)


def parse_load_line(start: int, line: bytes) -> LoadStep:
    rec = json.loads(line)
    layers = rec["layers"]
    lids = tuple(layers)
    return LoadStep(
        step=int(rec["step"]),
        lids=lids,
        num_experts=int(rec["num_experts"]),
        imbalance=np.array([layers[lid]["imbalance"] for lid in lids], dtype=np.float32),
        drop_rate=np.array([layers[lid]["drop_rate"] for lid in lids], dtype=np.float32),
        where=rec["arrays"] if "arrays" in rec else (start, len(line)),
        warnings=rec.get("warnings") or [],
    )


def parse_metrics_line(line: bytes) -> dict[str, float]:
    """The numbers of a metrics line that the page plots or shows."""
    row = json.loads(line)
    return {
        k: v
        for k, v in row.items()
        if isinstance(v, int | float)
        and math.isfinite(v)  # JSON has no NaN: a non-finite loss is a gap in its line
        and (k == "step" or k in SERIES or k.startswith(("time_", "comm_")))
    }


class RunIndex:
    """The server's compact view of one run directory, refreshed from the files' byte offsets; thread-safe."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.lock = threading.Lock()
        self.offsets = dict.fromkeys(FEEDS, 0)
        self.inodes: dict[str, int | None] = dict.fromkeys(FEEDS)
        self.last_step = dict.fromkeys(FEEDS, 0)
        self.metrics: dict[int, dict[str, float]] = {}  # by step: a resumed run's re-logged step replaces the old
        self.load: dict[int, LoadStep] = {}
        self.version = 0
        self._sorted: list[int] | None = None
        self._summary: dict[str, Any] | None = None

    def refresh(self, limit: int = INDEX_CHUNK) -> bool:
        """Reads at most `limit` new bytes of each file; True when both are read to their end."""
        with self.lock:
            done = True
            for feed, name in FEEDS.items():
                replaced = self._replaced(feed, self.run_dir / name)
                lines, self.offsets[feed], reset, more = read_lines(self.run_dir / name, self.offsets[feed], limit)
                done = done and not more
                reset = reset or replaced
                if reset:
                    (self.metrics if feed == "metrics" else self.load).clear()
                    self.last_step[feed] = 0
                for start, line in lines:
                    self._add(feed, start, line)
                if reset or lines:
                    self.version += 1
                    self._sorted = None
            return done

    def _replaced(self, feed: str, path: Path) -> bool:
        """Whether `path` is another file than the one read so far (then it is read from its start)."""
        inode = path.stat().st_ino if path.exists() else None
        replaced = self.inodes[feed] is not None and inode != self.inodes[feed]
        self.inodes[feed] = inode
        if replaced:
            self.offsets[feed] = 0
        return replaced

    def _add(self, feed: str, start: int, line: bytes) -> None:
        try:
            if feed == "metrics":
                row = parse_metrics_line(line)
                step, keep = int(row["step"]), self.metrics
                value: Any = row
            else:
                value = parse_load_line(start, line)
                step, keep = value.step, self.load
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # a line cut by a crash; the lines after it are still good
        if step <= self.last_step[feed]:  # a resumed run: the steps from here on are logged again
            for old in [s for s in keep if s >= step]:
                del keep[old]
        self.last_step[feed] = step
        keep[step] = value

    def load_steps(self) -> list[int]:
        """Logged load steps in order (call with the lock held)."""
        if self._sorted is None:
            self._sorted = sorted(self.load)
        return self._sorted

    def summary(self) -> dict[str, Any]:
        """Everything the page draws except the layer x expert heatmap; bounded in size (module docstring)."""
        with self.lock:
            if self._summary is None or self._summary["version"] != self.version:
                self._summary = {
                    "version": self.version,
                    "metrics": metrics_summary([self.metrics[s] for s in sorted(self.metrics)]),
                    "load": load_summary([self.load[s] for s in self.load_steps()]),
                }
            return self._summary

    def progress(self) -> float:
        """Fraction of expert_load.jsonl indexed: a large old-form run takes a while."""
        path = self.run_dir / FEEDS["expert_load"]
        size = path.stat().st_size if path.exists() else 0
        return min(1.0, self.offsets["expert_load"] / size) if size else 1.0

    def heatmap(self, index: int, quantities: tuple[str, ...]) -> dict[str, Any]:
        """The layer x expert grids of the `index`-th logged step (0 = oldest; -1 = newest)."""
        with self.lock:
            steps = self.load_steps()
            if not -len(steps) <= index < len(steps):
                raise IndexError(f"index={index} is outside the {len(steps)} logged steps")
            index %= len(steps)
            entry = self.load[steps[index]]
        grids = read_grids(self.run_dir, entry, quantities)  # file reads outside the lock
        return {
            "index": index,
            "count": len(steps),
            "step": entry.step,
            "layers": list(entry.lids),
            "num_experts": entry.num_experts,
            "z": grids,
        }


def read_grids(run_dir: Path, entry: LoadStep, quantities: tuple[str, ...]) -> dict[str, list]:
    """{quantity: [L][E]} of one logged step, from its inline line or its blob; zeros where a quantity is absent."""
    E = entry.num_experts
    if isinstance(entry.where, dict):
        arrays = read_blob(run_dir, entry.where)
    else:
        start, length = entry.where
        with (run_dir / FEEDS["expert_load"]).open("rb") as f:
            f.seek(start)
            layers = json.loads(f.read(length))["layers"]
        arrays = {q: np.array([layers[lid].get(q) or [0] * E for lid in entry.lids]) for q in quantities}
    zeros = np.zeros((len(entry.lids), E), dtype=np.int64)
    grids = {}
    for q in quantities:
        a = arrays.get(q)
        a = zeros if a is None else a
        grids[q] = a.tolist() if a.dtype.kind in "iu" else jsonable(round_sig(a, 7))  # float32 holds ~7 digits
    return grids


def metrics_summary(rows: list[dict[str, float]]) -> dict[str, Any]:
    """Decimated loss/throughput lines, the bucketed step breakdown, and the newest row for the status line."""
    series = {}
    for key in SERIES:
        have = [r for r in rows if key in r]
        series[key] = decimate(np.array([r["step"] for r in have]), np.array([r[key] for r in have], np.float64))
    return {
        "count": len(rows),
        "last": rows[-1] if rows else None,
        "series": series,
        "breakdown": breakdown([r for r in rows if "time_step_ms" in r]),
    }


def breakdown(sampled: list[dict[str, float]]) -> dict[str, Any]:
    """Per-phase times of the sampled steps, as the mean over at most MAX_BARS buckets of them."""
    keys = sorted({k for r in sampled for k in r if k.startswith(("time_", "comm_"))})
    edges = bucket_edges(len(sampled), MAX_BARS)
    steps = np.array([r["step"] for r in sampled], dtype=np.float64)
    buckets = list(zip(edges[:-1], edges[1:], strict=True))
    series = {}
    for key in keys:
        values = np.array([r.get(key, np.nan) for r in sampled], dtype=np.float64)
        with all_nan_ok():
            series[key] = jsonable(round_sig(np.array([np.nanmean(values[a:b]) for a, b in buckets])))
    return {
        "x": [round(float(steps[a:b].mean()), 1) for a, b in buckets],
        "per_bar": int(np.diff(edges).max()) if len(edges) > 1 else 1,
        "series": series,
    }


def load_summary(entries: list[LoadStep]) -> dict[str, Any]:
    """Imbalance and drop-rate lines, the layer x step imbalance heatmap, and the newest warnings."""
    if not entries:
        return {"count": 0, "layers": [], "imbalance": [], "drop_rate": [], "heat": None, "warnings": []}
    lids = entries[-1].lids
    steps = np.array([e.step for e in entries])
    imbalance, drop_rate = by_layer(entries, lids, "imbalance"), by_layer(entries, lids, "drop_rate")
    return {
        "count": len(entries),
        "layers": list(lids),
        "num_experts": entries[-1].num_experts,
        "imbalance": layer_lines(steps, imbalance, lids),
        "drop_rate": layer_lines(steps, drop_rate, lids),
        "heat": step_heat(steps, imbalance),
        "warnings": newest_warnings(entries),
    }


def by_layer(entries: list[LoadStep], lids: tuple[str, ...], name: str) -> np.ndarray:
    """[S, L] of a per-layer figure, NaN where a step lacks a layer (a run resumed with other layers)."""
    out = np.full((len(entries), len(lids)), np.nan, dtype=np.float32)
    for i, e in enumerate(entries):
        values = getattr(e, name)
        if e.lids == lids:
            out[i] = values
        else:
            for j, lid in enumerate(lids):
                if lid in e.lids:
                    out[i, j] = values[e.lids.index(lid)]
    return out


def layer_lines(steps: np.ndarray, values_SL: np.ndarray, lids: tuple[str, ...]) -> list[dict[str, Any]]:
    """A decimated line per layer, or, past LINES_MAX_LAYERS, the max and the mean over layers."""
    if len(lids) <= LINES_MAX_LAYERS:
        return [{"name": f"layer {lid}", **decimate(steps, values_SL[:, j])} for j, lid in enumerate(lids)]
    with all_nan_ok():  # a step with no layer in common stays NaN, and decimate drops it
        worst, mean = np.nanmax(values_SL, axis=1), np.nanmean(values_SL, axis=1)
    return [
        {"name": "max over layers", **decimate(steps, worst)},
        {"name": "mean over layers", **decimate(steps, mean)},
    ]


def step_heat(steps: np.ndarray, values_SL: np.ndarray) -> dict[str, Any]:
    """[L, columns] max of each bucket of steps; x = each bucket's first step, index = its first logged index."""
    edges = bucket_edges(len(steps), MAX_COLUMNS)
    z = np.fmax.reduceat(values_SL, edges[:-1], axis=0).T  # fmax: a NaN only where the whole bucket is NaN
    return {"x": steps[edges[:-1]].tolist(), "index": edges[:-1].tolist(), "z": jsonable(round_sig(z, 4))}


def newest_warnings(entries: list[LoadStep]) -> list[str]:
    out: list[str] = []
    for e in reversed(entries):
        out[:0] = [f"step {e.step}: {w}" for w in e.warnings]
        if len(out) >= WARNINGS_SHOWN:
            break
    return out[-WARNINGS_SHOWN:]
