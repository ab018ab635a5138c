"""What CRIU records about a dump in its images directory (`stats-dump`)."""

from __future__ import annotations

from pathlib import Path

STATS_DUMP = "stats-dump"


def frozen_ms(images: Path) -> float:
    """The frozen time CRIU recorded for the dump in `images` (its `stats-dump`: from
    freezing the tree until it was dumped), ms. OSError or ValueError where it has none."""
    data = (images / STATS_DUMP).read_bytes()
    size = int.from_bytes(data[8:12], "little")  # after the two magics
    fields = _protobuf(data[12 : 12 + size])
    entry = fields.get(1)  # StatsEntry.dump: DumpStatsEntry
    if not isinstance(entry, bytes):
        raise ValueError(f"{images / STATS_DUMP}: no dump statistics")
    frozen = _protobuf(entry).get(2)  # frozen_time, µs
    if not isinstance(frozen, int):
        raise ValueError(f"{images / STATS_DUMP}: no frozen time")
    return frozen / 1000


def _protobuf(data: bytes) -> dict[int, bytes | int]:
    """The fields of one protobuf message (varints and length-delimited only: all CRIU's
    stats use)."""
    fields: dict[int, bytes | int] = {}
    at = 0

    def varint() -> int:
        nonlocal at
        value = shift = 0
        while True:
            if at >= len(data):
                raise ValueError("truncated varint in CRIU stats")
            byte = data[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while at < len(data):
        key = varint()
        number, kind = key >> 3, key & 7
        if kind == 0:
            fields[number] = varint()
        elif kind == 2:
            length = varint()
            fields[number] = data[at : at + length]
            at += length
        else:
            raise ValueError(f"protobuf wire type {kind} in CRIU stats")
    return fields
