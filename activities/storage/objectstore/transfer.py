"""What every transfer shares: tuning settings, progress reports and the byte meter."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from api.manifest import Manifest

MiB = 1 << 20
# S3 allows at most 10 000 parts per object and at least 5 MiB per part but the last.
MAX_PARTS = 10_000
MIN_PART_SIZE = 5 * MiB


@dataclass(frozen=True)
class TransferSettings:
    """How a version moves: part size and concurrency (bytes in flight are at most
    `concurrency * part_size`), server-side encryption, durability of local writes, and
    whether the S3 backend stores files zstd-compressed where that pays (`compression`)."""

    part_size: int = 64 * MiB
    concurrency: int = 16
    sse: Literal["", "AES256", "aws:kms"] = ""
    kms_key_id: str = ""
    durable: bool = True  # written files reach the disk before the manifest commits them
    copy_buffer: int = 1 * MiB  # the filesystem backend's read/write size (cache-sized)
    # "auto": a file whose sample compresses well is stored as `<path>.zst` (see
    # objectstore.compression); "off": every file as it is. Downloads read either way.
    compression: Literal["off", "auto"] = "auto"
    # Page images with a chunk table stay plain whatever `compression` says: a restore
    # streams them by range, which a zstd frame does not allow (decision 0039).
    streamable: bool = False

    def part_size_for(self, size: int) -> int:
        """The part size for a file of `size` bytes: ours, grown to stay within 10 000 parts."""
        needed = -(-size // MAX_PARTS)
        return max(self.part_size, MIN_PART_SIZE, needed)


@dataclass(frozen=True)
class TransferProgress:
    """`bytes_done` counts bytes known to be in place (resumed parts included);
    `bytes_transferred` only those that crossed the wire, and `rate` is theirs, per second."""

    bytes_done: int
    bytes_total: int
    bytes_transferred: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.bytes_transferred / self.seconds if self.seconds > 0 else 0.0


ProgressCallback = Callable[[TransferProgress], None]


@dataclass(frozen=True)
class TransferReport:
    """What a finished transfer did; `manifest` is the version's, as verified."""

    manifest: Manifest
    bytes_total: int
    bytes_transferred: int
    seconds: float


class Meter:
    """Thread-safe byte counts; reports each change to `callback` (an exception it raises
    stops the transfer, which a retry resumes)."""

    def __init__(self, *, total: int, callback: ProgressCallback | None) -> None:
        self._total = total
        self._callback = callback
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self.done = 0
        self.transferred = 0

    def add(self, *, done: int, transferred: int) -> None:
        with self._lock:
            self.done += done
            self.transferred += transferred
            if self._callback is not None:
                self._callback(
                    TransferProgress(self.done, self._total, self.transferred, self.seconds)
                )

    @property
    def seconds(self) -> float:
        return time.monotonic() - self._start

    def report(self, manifest: Manifest) -> TransferReport:
        return TransferReport(manifest, self._total, self.transferred, self.seconds)
