"""The node's bound on concurrent CRIU restores (decision 0040): never more than the limit
hold a slot, a freed slot goes to the oldest waiter, and a restore that waits past its
deadline gives up naming the setting, without taking a slot from those behind it."""

from __future__ import annotations

import asyncio

import pytest

from activities.criu.slots import RestoreSlots
from api.errors import WarmstartError
from api.reasons import Reason


async def test_at_most_the_limit_hold_slots_and_waiters_go_in_arrival_order() -> None:
    slots = RestoreSlots(2)
    release = {i: asyncio.Event() for i in range(6)}
    entered: list[int] = []
    places: dict[int, list[int]] = {i: [] for i in range(6)}

    async def restore(i: int) -> int:
        async with slots.slot(timeout=60, what=f"restore {i}", waiting=places[i].append) as grant:
            entered.append(i)
            assert grant.running <= 2
            await release[i].wait()
            return grant.running

    tasks = [asyncio.create_task(restore(i)) for i in range(6)]
    await asyncio.sleep(0.01)
    assert entered == [0, 1]
    assert slots.stats().running == 2 and slots.stats().waiting == 4
    assert [places[i][:1] for i in range(6)] == [[], [], [1], [2], [3], [4]]
    # A newcomer does not overtake those waiting, even the moment a slot frees.
    for i in (1, 0, 3, 2, 5, 4):
        release[i].set()
        await asyncio.sleep(0.01)
    assert entered == [0, 1, 2, 3, 4, 5]
    assert max(await asyncio.gather(*tasks)) == 2
    stats = slots.stats()
    assert (stats.granted, stats.peak, stats.running, stats.waiting) == (6, 2, 0, 0)


async def test_a_restore_waiting_past_its_deadline_gives_up_and_passes_nothing_on() -> None:
    slots = RestoreSlots(1)
    hold = asyncio.Event()

    async def holder() -> None:
        async with slots.slot(timeout=60, what="first"):
            await hold.wait()

    first = asyncio.create_task(holder())
    await asyncio.sleep(0)
    with pytest.raises(WarmstartError, match="MAX_CONCURRENT_RESTORES") as late:
        async with slots.slot(timeout=0.05, what="restore of late"):
            raise AssertionError("entered past its deadline")
    assert late.value.reason == Reason.STEP_TIMED_OUT
    assert "restore of late" in late.value.message
    # A cancelled waiter leaves the queue too; the next one still gets the slot.
    cancelled = asyncio.create_task(slots.slot(timeout=60, what="cancelled").__aenter__())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    hold.set()
    await first
    async with slots.slot(timeout=1, what="next") as grant:
        assert grant.running == 1
    assert slots.stats().timed_out == 1 and slots.stats().running == 0


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RestoreSlots(0)
