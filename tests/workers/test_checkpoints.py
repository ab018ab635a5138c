"""The node's reads of Checkpoints: by namespace and name, one in flight each, an answer kept
a short while, a failure never kept, and an older read never kept over a newer one."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from api.errors import UnavailableError
from workers.checkpoints import CheckpointViews


class Reader:
    """Answers `version` for each read, after `gate` opens (when one is set)."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        self.version = "v1"
        self.fail = False
        self.gates: list[asyncio.Event] = []

    async def __call__(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        self.asked.append((namespace, name))
        version = self.version
        if self.gates:
            await self.gates.pop(0).wait()
        if self.fail:
            raise UnavailableError("read Checkpoint: the API server is away")
        return {"metadata": {"name": name, "namespace": namespace}, "status": {"version": version}}


def version(found: tuple[Mapping[str, Any] | None, bool]) -> tuple[str, bool]:
    checkpoint, kept = found
    assert checkpoint is not None
    return checkpoint["status"]["version"], kept


async def test_one_read_in_flight_then_kept_until_it_is_old() -> None:
    reader, now = Reader(), [0.0]
    views = CheckpointViews(reader, ttl_seconds=30, clock=lambda: now[0])
    views.read_ahead("team-a", "llama")
    views.read_ahead("team-a", "llama")  # under way: not again
    assert version(await views.get("team-a", "llama")) == ("v1", False)
    assert version(await views.get("team-a", "llama")) == ("v1", True)
    assert reader.asked == [("team-a", "llama")] and views.reads == 1
    await views.get("team-b", "llama")  # another namespace's is another read
    now[0] = 31.0
    reader.version = "v2"
    assert version(await views.get("team-a", "llama")) == ("v2", False)
    assert version(await views.get("team-a", "llama", fresh=True)) == ("v2", False)
    assert views.reads == 4


async def test_a_failed_read_is_not_kept() -> None:
    reader = Reader()
    reader.fail = True
    views = CheckpointViews(reader)
    views.read_ahead("team-a", "llama")
    with pytest.raises(UnavailableError):
        await views.get("team-a", "llama")
    reader.fail = False
    assert version(await views.get("team-a", "llama")) == ("v1", False)


async def test_an_older_read_landing_late_is_not_kept_over_a_newer_one() -> None:
    reader, now = Reader(), [0.0]
    views = CheckpointViews(reader, clock=lambda: now[0])
    slow = asyncio.Event()
    reader.gates = [slow]
    views.read_ahead("team-a", "llama")  # v1, held
    await asyncio.sleep(0)
    now[0], reader.version = 1.0, "v2"
    assert version(await views.get("team-a", "llama", fresh=True)) == ("v2", False)
    slow.set()
    await asyncio.sleep(0.01)
    assert version(await views.get("team-a", "llama")) == ("v2", True)
