"""Where each dumped page lies in a CRIU page image: the pagemap images, read.

A pagemap image (`pagemap-<id>.img` for a task, `pagemap-shmem-<id>.img` for shared memory)
is CRIU's image framing (two magics, then records: a 32-bit length and a protobuf message):
a head naming its page image (`pages-<pages_id>.img`), then entries `vaddr`, `nr_pages`,
`flags`. The pages of the entries that have them (PE_PRESENT) follow one another in the
page image, in entry order. An entry also marked PE_LAZY may be left to a lazy restore's
page server; the restore itself reads every other present page from the image.

Only the fields a streamed restore needs are decoded (decision 0039).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

from api.errors import RestoreFailedError

PAGE_SIZE = 4096
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
_IMG_COMMON_MAGIC = 0x54564319
_PAGEMAP_MAGIC = 0x56084025
_TASK_PAGEMAP = re.compile(r"^pagemap-(\d+)\.img$")
_SHMEM_PAGEMAP = re.compile(r"^pagemap-shmem-(\d+)\.img$")


@dataclass(frozen=True)
class PageRun:
    """Pages [vaddr, vaddr + pages * PAGE_SIZE) of one pagemap entry, at `offset` in its page
    image when `present`."""

    vaddr: int
    pages: int
    flags: int
    offset: int

    @property
    def present(self) -> bool:
        return bool(self.flags & PE_PRESENT)

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY)

    @property
    def length(self) -> int:
        return self.pages * PAGE_SIZE


@dataclass(frozen=True)
class Pagemap:
    """One pagemap image: its page image's name and its entries in order."""

    pages_file: str
    runs: tuple[PageRun, ...]
    shmem: bool = False

    def locate(self, vaddr: int, pages: int) -> list[tuple[int, int]]:
        """(offset, length) in the page image of pages [vaddr, vaddr + pages), which must
        all be present; RestoreFailedError otherwise."""
        spans: list[tuple[int, int]] = []
        end = vaddr + pages * PAGE_SIZE
        at = vaddr
        for run in self.runs:
            run_end = run.vaddr + run.length
            if run_end <= at or run.vaddr >= end:
                continue
            if run.vaddr > at or not run.present:
                break
            stop = min(end, run_end)
            offset = run.offset + (at - run.vaddr)
            length = stop - at
            if spans and spans[-1][0] + spans[-1][1] == offset:
                spans[-1] = (spans[-1][0], spans[-1][1] + length)
            else:
                spans.append((offset, length))
            at = stop
            if at >= end:
                return spans
        raise RestoreFailedError(
            f"{self.pages_file}: pages {vaddr:#x}+{pages} are not all present in the pagemap"
        )


def read_pagemap(path: Path) -> Pagemap:
    """Decode one pagemap image; RestoreFailedError naming it when it is not one."""
    data = path.read_bytes()
    where = str(path)
    if len(data) < 8 or struct.unpack_from("<II", data) != (_IMG_COMMON_MAGIC, _PAGEMAP_MAGIC):
        raise RestoreFailedError(f"{where}: not a CRIU pagemap image")
    records = list(_records(data, 8, where))
    if not records:
        raise RestoreFailedError(f"{where}: a pagemap image without its head")
    head = _fields(records[0], where)
    pages_id = head.get(1, 0)
    runs = []
    offset = 0
    for record in records[1:]:
        fields = _fields(record, where)
        vaddr = fields.get(1, 0)
        pages = fields.get(5, fields.get(2, 0))
        if 4 in fields:
            flags = fields[4]
        elif fields.get(3):
            flags = PE_PARENT
        else:
            flags = PE_PRESENT
        runs.append(PageRun(vaddr=vaddr, pages=pages, flags=flags, offset=offset))
        if flags & PE_PRESENT:
            offset += pages * PAGE_SIZE
    return Pagemap(pages_file=f"pages-{pages_id}.img", runs=tuple(runs))


def read_pagemaps(images_dir: Path) -> dict[tuple[str, int], Pagemap]:
    """Every pagemap of an images directory by ("task" | "shmem", id)."""
    found: dict[tuple[str, int], Pagemap] = {}
    for path in sorted(images_dir.iterdir()):
        task, shmem = _TASK_PAGEMAP.match(path.name), _SHMEM_PAGEMAP.match(path.name)
        if task:
            found["task", int(task.group(1))] = read_pagemap(path)
        elif shmem:
            pagemap = read_pagemap(path)
            found["shmem", int(shmem.group(1))] = Pagemap(
                pages_file=pagemap.pages_file, runs=pagemap.runs, shmem=True
            )
    return found


def restore_reads(pagemaps: dict[tuple[str, int], Pagemap]) -> dict[str, list[tuple[int, int]]]:
    """Page image → the (offset, length) spans that `criu restore --lazy-pages` itself reads:
    every present page but a task's lazy ones (shared memory is always restored eagerly)."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for pagemap in pagemaps.values():
        for run in pagemap.runs:
            if run.present and (pagemap.shmem or not run.lazy):
                spans.setdefault(pagemap.pages_file, []).append((run.offset, run.length))
    return spans


def _records(data: bytes, at: int, where: str):  # type: ignore[no-untyped-def]
    while at < len(data):
        if at + 4 > len(data):
            raise RestoreFailedError(f"{where}: a record's length is cut short")
        (size,) = struct.unpack_from("<I", data, at)
        at += 4
        if at + size > len(data):
            raise RestoreFailedError(f"{where}: a record of {size} bytes is cut short")
        yield data[at : at + size]
        at += size


def _fields(message: bytes, where: str) -> dict[int, int]:
    """The varint fields of a protobuf message by number (the only kind pagemaps have)."""
    fields: dict[int, int] = {}
    at = 0
    while at < len(message):
        key, at = _varint(message, at, where)
        number, wire = key >> 3, key & 7
        if wire != 0:
            raise RestoreFailedError(f"{where}: field {number} has wire type {wire}, not varint")
        fields[number], at = _varint(message, at, where)
    return fields


def _varint(data: bytes, at: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise RestoreFailedError(f"{where}: a varint is cut short")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at
