"""What checkpoint checksums cost: DCP save and load of a ~1.5 GB state dict with and without them.

save: DCP's FileSystemWriter (fsync on, one file per rank, as parallel/checkpoint.py saves) against our
ChecksumWriter, which computes each file's CRC-32C from the bytes as they are written. load: dcp.load alone
against `verify_checksums` (reads every file once and compares its CRC-32C) followed by dcp.load. One process;
the two variants alternate, each timed `--repeats` times, and the table reports the fastest of each and the
ratio (with / without). The files are read back from the page cache, so the load ratio is an upper bound for a
cold read from disk, where I/O takes longer and the checksum's share is smaller.

Run: .venv/bin/python benchmarks/checksum_overhead.py [--gb 1.5] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import crc32c
import torch
import torch.distributed.checkpoint as dcp

from moeyard.parallel.checkpoint import verify_checksums
from moeyard.parallel.checksums import ChecksumWriter

TENSOR_MB = 64  # a typical shard: an expert's weight slice, a sharded embedding


def make_state(gb: float) -> dict[str, torch.Tensor]:
    n = max(1, round(gb * 1024 / TENSOR_MB))
    numel = TENSOR_MB * (1 << 20) // 4
    return {f"t{i}": torch.randn(numel) for i in range(n)}


def save(state: dict[str, torch.Tensor], path: Path, checksums: bool) -> dict | None:
    """Saves `state` into `path`; with checksums, returns what meta.json would record."""
    kind = ChecksumWriter if checksums else dcp.FileSystemWriter
    writer = kind(path, single_file_per_rank=True, sync_files=True)
    dcp.save(state, storage_writer=writer, no_dist=True)
    if not checksums:
        return None
    names = sorted(p.name for p in path.iterdir())
    return {"format": 2, "files": {n: (path / n).stat().st_size for n in names}, "checksums": writer.checksums}


def load(state: dict[str, torch.Tensor], path: Path, meta: dict | None) -> None:
    if meta is not None:
        verify_checksums(path, meta, "benchmark")
    dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)


def round_trip(state: dict, into: dict, path: Path, checksums: bool) -> tuple[float, float]:
    """(save seconds, load seconds) of one save into `path` and its load into `into`."""
    start = time.perf_counter()
    meta = save(state, path, checksums)
    saved = time.perf_counter()
    load(into, path, meta)
    loaded = time.perf_counter()
    assert all(torch.equal(into[k], state[k]) for k in state)
    return saved - start, loaded - saved


def crc_seconds(state: dict[str, torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for t in state.values():
            crc32c.crc32c(t.numpy().data)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 MB, one repeat: a smoke run")
    args = parser.parse_args()
    gb, repeats = (TENSOR_MB / 1024, 1) if args.quick else (args.gb, args.repeats)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    torch.manual_seed(0)
    state = make_state(gb)
    into = {k: torch.empty_like(v) for k, v in state.items()}
    size = sum(v.numel() * v.element_size() for v in state.values()) / 1e9
    best = {False: [float("inf")] * 2, True: [float("inf")] * 2}  # checksums -> [save, load]
    root = Path(tempfile.mkdtemp(prefix="checksum_overhead_"))
    try:
        for i in range(repeats):
            for checksums in (False, True):
                times = round_trip(state, into, root / f"r{i}-{checksums}", checksums)
                best[checksums] = [min(b, t) for b, t in zip(best[checksums], times, strict=True)]
                shutil.rmtree(root / f"r{i}-{checksums}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load_avg = os.getloadavg()[0]
    print(f"checkpoint of {size:.2f} GB, {len(state)} tensors, fastest of {repeats}, load average {load_avg:.1f}")
    print(f"crc32c alone over the same bytes in memory: {crc_seconds(state, repeats):.2f}s (the floor of the cost)")
    print(f"{'':8}{'without':>10}{'with crc32c':>14}{'ratio':>8}")
    for j, row in enumerate(("save", "load")):
        plain, crc = best[False][j], best[True][j]
        print(f"{row:8}{plain:>9.2f}s{crc:>13.2f}s{crc / plain:>8.2f}")


if __name__ == "__main__":
    main()
