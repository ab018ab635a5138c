"""Chunk tables: the SHA-256 of every 1 MiB of a CRIU page image, so that a range of it can
be checked on its own (a restore that streams its pages from the bucket, decision 0039).

A version's page images (`criu/pages-<n>.img`) of 8 MiB or more each get a table at
commit, hashed in the same pass as the file's own digest, stored as a file of the version
(`chunks/criu/pages-<n>.img.sha256`). The manifest lists the table with its digest like any
other file, so a table is as trustworthy as the manifest, and every chunk as its table.

Format: `WSCHUNK1`, the chunk size (u32) and the file's size (u64), little-endian, then one
32-byte digest per chunk, the last chunk possibly short.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from api.errors import DigestMismatchError

CHUNK_SIZE = 1 << 20
# A smaller page image gets no table: it is fetched whole with the version's other files
# (a few ranged GETs' worth), and only images with a table stream.
MIN_TABLE_SIZE = 8 << 20
TABLES_DIR = "chunks"
TABLE_SUFFIX = ".sha256"
_MAGIC = b"WSCHUNK1"
_HEADER = struct.Struct("<8sIQ")
_DIGEST = 32
# A CRIU page image, wherever its images directory sits in the version.
_PAGE_IMAGE = re.compile(r"(^|/)pages-\d+\.img$")


def has_table(path: str, size: int) -> bool:
    """Whether the version's file `path` (relative) of `size` bytes gets a chunk table: a
    page image of at least `MIN_TABLE_SIZE`."""
    is_image = bool(_PAGE_IMAGE.search(path)) and not path.startswith(f"{TABLES_DIR}/")
    return is_image and size >= MIN_TABLE_SIZE


def table_path(path: str) -> str:
    """Where the chunk table of the version's file `path` is, relative to the version."""
    return f"{TABLES_DIR}/{path}{TABLE_SUFFIX}"


@dataclass(frozen=True)
class ChunkTable:
    chunk_size: int
    size: int
    digests: tuple[bytes, ...]

    @property
    def chunks(self) -> int:
        return len(self.digests)

    def span(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk `index` in the file."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def covering(self, offset: int, length: int) -> range:
        """The chunks holding bytes [offset, offset + length)."""
        if length <= 0:
            return range(0)
        return range(offset // self.chunk_size, (offset + length - 1) // self.chunk_size + 1)

    def check(self, index: int, data: bytes | memoryview, *, where: str) -> None:
        """DigestMismatchError unless `data` is chunk `index` as committed."""
        offset, length = self.span(index)
        if len(data) != length or hashlib.sha256(data).digest() != self.digests[index]:
            raise DigestMismatchError(
                f"{where}: bytes {offset}-{offset + length - 1} (chunk {index}) do not match "
                "their SHA-256 digest in the version's chunk table"
            )

    def encode(self) -> bytes:
        return _HEADER.pack(_MAGIC, self.chunk_size, self.size) + b"".join(self.digests)

    @classmethod
    def decode(cls, data: bytes, *, where: str) -> ChunkTable:
        if len(data) < _HEADER.size:
            raise DigestMismatchError(f"{where}: a chunk table of {len(data)} bytes is cut short")
        magic, chunk_size, size = _HEADER.unpack_from(data)
        if magic != _MAGIC or chunk_size <= 0:
            raise DigestMismatchError(f"{where}: not a chunk table")
        count = -(-size // chunk_size)
        body = data[_HEADER.size :]
        if len(body) != count * _DIGEST:
            raise DigestMismatchError(
                f"{where}: a table of a {size}-byte file holds {len(body)} bytes of digests, "
                f"expected {count * _DIGEST}"
            )
        digests = tuple(body[i : i + _DIGEST] for i in range(0, len(body), _DIGEST))
        return cls(chunk_size=chunk_size, size=size, digests=digests)

    @classmethod
    def read(cls, path: Path) -> ChunkTable:
        return cls.decode(path.read_bytes(), where=str(path))


def digest_with_table(path: Path, chunk_size: int = CHUNK_SIZE) -> tuple[str, ChunkTable]:
    """The file's SHA-256 (hex) and its chunk table, in one read."""
    whole = hashlib.sha256()
    digests = []
    size = 0
    with path.open("rb") as src:
        while block := src.read(chunk_size):
            whole.update(block)
            digests.append(hashlib.sha256(block).digest())
            size += len(block)
    return whole.hexdigest(), ChunkTable(chunk_size=chunk_size, size=size, digests=tuple(digests))
