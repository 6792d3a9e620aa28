"""Checksums of checkpoint files: computed while DCP writes each file, recorded at the seal, verified on load.

The checksum is CRC-32C (the `crc32c` package: hardware CRC instructions, a portable fallback elsewhere).
Measured on one loaded CPU core here: ~5 GB/s, against ~0.9 GB/s for the standard library's zlib.crc32,
which would cost about as much as the write itself. It is the checksum storage systems use for the same job
(ext4 metadata, iSCSI, cloud object stores), and it detects every single-bit flip and every burst of up to
32 flipped bits, whatever the file size (a 64-bit hash such as xxh3 only makes a miss unlikely).

Each rank checksums the bytes of its own files as they stream out (no second read), so the cost is spread
over the ranks like the write; verification reads each file once, split over the ranks that load it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Generator, Iterable
from contextlib import contextmanager
from pathlib import Path

import crc32c
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem

ALGORITHM = "crc32c"
_READ_CHUNK = 16 << 20  # bytes per read when verifying: large enough that the CRC, not the call, dominates


class _ChecksummedStream(io.RawIOBase):
    """A binary file opened for writing whose running CRC-32C covers every byte written through it."""

    def __init__(self, raw: io.IOBase) -> None:
        super().__init__()
        self.raw = raw
        self.crc = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.crc = crc32c.crc32c(data, self.crc)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        super().close()  # flushes first
        self.raw.close()


class _ChecksummingFileSystem(FileSystem):
    """DCP's local file system, recording the CRC-32C of every file it writes, by file name."""

    def __init__(self) -> None:
        super().__init__()
        self.checksums: dict[str, int] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _ChecksummedStream(raw)
            yield stream
            self.checksums[Path(path).name] = stream.crc

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP writes .metadata as a .tmp file first: its checksum follows it
        if Path(path).name in self.checksums:
            self.checksums[Path(new_path).name] = self.checksums.pop(Path(path).name)


class ChecksumWriter(dcp.FileSystemWriter):
    """FileSystemWriter whose `checksums` holds the CRC-32C of each file this rank wrote, once written."""

    def __init__(self, path: str | os.PathLike, **kwargs) -> None:
        super().__init__(path, **kwargs)
        self.fs = _ChecksummingFileSystem()

    @property
    def checksums(self) -> dict[str, int]:
        return self.fs.checksums


def file_checksum(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            crc = crc32c.crc32c(chunk, crc)
    return crc


def first_mismatch(path: Path, checksums: dict[str, int], names: Iterable[str]) -> str | None:
    """The first of `names` in checkpoint `path` whose contents do not match its recorded checksum, said in
    a few words; None when all match."""
    for name in names:
        if name not in checksums:
            return f"{name} has no recorded checksum"
        actual = file_checksum(path / name)
        if actual != checksums[name]:
            return f"{name} has {ALGORITHM} {actual:08x}, meta.json records {checksums[name]:08x}"
    return None
