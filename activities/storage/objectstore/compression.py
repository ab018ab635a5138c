"""zstd compression of stored files, only where it pays: a file of at least 1 MiB whose
first 4 MiB compress (level 3) to under 75% is stored as one zstd frame; others, random or
already compressed data among them, stay as they are.

A large file is read once, in parts (`FileReading`); compressed, its frame is cut into
parts at fixed compressed-byte boundaries as it is made. zstd's multi-threaded mode gives
the same bytes for the same input, level and parameters whatever the number of threads or
the sizes of the reads that feed it, so a retry makes the same parts again and finds those
already stored (a different libzstd may compress differently: such parts then fail their
ETag check and are simply sent again).
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import zstandard

from activities.storage.objectstore.placing import PartialFile
from api.errors import DigestMismatchError

MiB = 1 << 20
LEVEL = 3
MIN_FILE_SIZE = 1 * MiB  # below this, a request costs more than the bytes it could save
SAMPLE_SIZE = 4 * MiB
WORTHWHILE_RATIO = 0.75
_WRITE_SIZE = 1 * MiB  # decompressed bytes handed to the file at a time
# Compression threads for a large file (the output is the same for any number from one up);
# each holds a few jobs' worth of buffers, so not one per core on a big node.
_THREADS = min(os.cpu_count() or 1, 8)


def worth_compressing(sample: bytes | memoryview) -> bool:
    """Whether a file that starts with `sample` (its first SAMPLE_SIZE bytes, or all of it)
    is worth storing compressed."""
    if len(sample) == 0:
        return False
    compressed = zstandard.ZstdCompressor(level=LEVEL).compress(sample)
    return len(compressed) < WORTHWHILE_RATIO * len(sample)


def compress_whole(data: bytes) -> bytes:
    """`data` as one zstd frame (for files sent with one request)."""
    return zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(data)


def compressed_bound(size: int) -> int:
    """At most how many bytes the frame of `size` plain bytes takes (zstd's bound, rounded
    up): parts are sized from it, so the parts stay within S3's count."""
    return size + (size >> 7) + 128 * 1024


@dataclass(frozen=True)
class Part:
    """A piece of a file's object as sent: its number (from 1), its bytes, and how many of
    the file's plain bytes it accounts for (in progress reports)."""

    number: int
    data: bytes
    plain: int


class FileReading:
    """One file read once, in parts: plain parts of `part_size`, or, if `packed_part_size`
    is given and its first bytes are worth it, its frame in parts of that many compressed
    bytes. `sha256` and `size` are the plain bytes' once `parts()` is exhausted."""

    def __init__(self, path: Path, *, part_size: int, packed_part_size: int | None) -> None:
        self._path = path
        self._part_size = part_size
        self._packed_part_size = packed_part_size
        self._digest = hashlib.sha256()
        self.size = 0
        self.compressed = False  # known once the first part is out

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def _chunks(self) -> Iterator[bytes]:
        with self._path.open("rb", buffering=0) as src:
            while data := src.read(self._part_size):
                self._digest.update(data)
                self.size += len(data)
                yield data

    def parts(self) -> Iterator[Part]:
        chunks = self._chunks()
        first = next(chunks, b"")
        rest = itertools.chain((first,) if first else (), chunks)
        if self._packed_part_size is not None and worth_compressing(
            memoryview(first)[:SAMPLE_SIZE]
        ):
            self.compressed = True
            yield from _compressed(rest, part_size=self._packed_part_size)
            return
        for number, data in enumerate(rest, start=1):
            yield Part(number, data, len(data))


def _compressed(chunks: Iterator[bytes], *, part_size: int) -> Iterator[Part]:
    # No size pledged: a file that changed since its commit then fails its digest check
    # by name, rather than as a zstd error.
    compressor = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True, threads=_THREADS)
    stream = compressor.chunker(chunk_size=part_size)
    number, plain = 1, 0
    for chunk in chunks:
        plain += len(chunk)
        for data in stream.compress(chunk):
            yield Part(number, data, plain)
            number, plain = number + 1, 0
    # At least the frame's end. (The stubs leave the chunker's methods unannotated.)
    for data in stream.finish():  # type: ignore[no-untyped-call]
        yield Part(number, data, plain)
        number, plain = number + 1, 0


class DecompressingFile:
    """A `PartialFile` fed with a zstd stream in order: decompressed as it arrives, the
    plain bytes hashed and written; a stream zstd rejects is DigestMismatchError naming
    `where` (the compressed object)."""

    def __init__(self, partial: PartialFile, *, where: str) -> None:
        self._partial = partial
        self._where = where
        # zstandard only calls write() on the file it writes to.
        sink = cast("IO[bytes]", partial)
        decompressor = zstandard.ZstdDecompressor()
        self._writer = decompressor.stream_writer(sink, write_size=_WRITE_SIZE, closefd=False)

    @property
    def size(self) -> int:
        """Plain bytes written so far."""
        return self._partial.size

    def write(self, data: bytes | memoryview) -> None:
        try:
            self._writer.write(data)
        except zstandard.ZstdError as err:
            raise DigestMismatchError(f"{self._where} is not a valid zstd stream: {err}") from err

    def finish(self) -> None:
        """Rename into place if size and digest match; otherwise remove it and raise."""
        try:
            self._writer.flush()  # type: ignore[no-untyped-call]  # unannotated in the stubs
        except zstandard.ZstdError as err:
            self._partial.discard()
            raise DigestMismatchError(f"{self._where} is not a valid zstd stream: {err}") from err
        self._partial.finish()

    def discard(self) -> None:
        self._partial.discard()
