"""A node's bound on concurrent CRIU restores: a first-come, first-served queue of slots.

Many restores of one checkpoint landing on one node at once (a scale-up) would otherwise
start as many `criu restore` processes together, each mapping and copying its page images
at the same time: the node's CPUs and page cache are shared, so each one is slower and the
first answer comes later than with a few at a time. `RestoreSlots` lets at most `limit`
restores into CRIU at once (`WARMSTART_CRIU__MAX_CONCURRENT_RESTORES`, decision 0040); the
others wait in arrival order (a freed slot is handed to the oldest waiter, never taken by a
newcomer), each at most until its own deadline. It counts what it did (`peak`, `granted`,
`timed_out`), so a storm's bound can be checked rather than assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from api.errors import WarmstartError
from api.reasons import Reason

# How often a waiting restore reports that it still waits (its heartbeat).
WAIT_REPORT_SECONDS = 5.0


@dataclass(frozen=True)
class SlotStats:
    """What the queue did since the worker started: restores let into CRIU, the most at once,
    restores that gave up waiting, and how many run or wait now."""

    limit: int
    granted: int
    peak: int
    timed_out: int
    running: int
    waiting: int


@dataclass(frozen=True)
class Grant:
    """A slot held: how long it was waited for, and how many restores hold one now (this
    one included)."""

    waited_seconds: float
    running: int


class RestoreSlots:
    """At most `limit` holders at once; waiters served in arrival order."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"at least one concurrent restore is needed, not {limit}")
        self.limit = limit
        self._running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._granted = 0
        self._peak = 0
        self._timed_out = 0

    def stats(self) -> SlotStats:
        return SlotStats(
            limit=self.limit,
            granted=self._granted,
            peak=self._peak,
            timed_out=self._timed_out,
            running=self._running,
            waiting=len(self._waiting),
        )

    @contextlib.asynccontextmanager
    async def slot(
        self,
        *,
        timeout: float,
        what: str,
        waiting: Callable[[int], Awaitable[None] | None] | None = None,
    ) -> AsyncIterator[Grant]:
        """Hold a slot for the block. A restore that waits `timeout` seconds without one
        gives up (`StepTimedOut`, naming `what`): it would answer past its deadline.
        `waiting` is called with the queue position (1: next) when it starts to wait and
        every few seconds after."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        if self._running < self.limit and not self._waiting:
            self._take()
        else:
            await self._wait(loop.time() + timeout, timeout, what, waiting)
        try:
            yield Grant(waited_seconds=loop.time() - started, running=self._running)
        finally:
            self._release()

    async def _wait(
        self,
        deadline: float,
        timeout: float,
        what: str,
        waiting: Callable[[int], Awaitable[None] | None] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._waiting.append(turn)
        try:
            if waiting is not None:
                reported = waiting(len(self._waiting))
                if reported is not None:
                    await reported
            while not turn.done():
                left = deadline - loop.time()
                if left <= 0:
                    self._timed_out += 1
                    raise WarmstartError(
                        f"{what}: waited {timeout:g} s for one of this node's "
                        f"{self.limit} concurrent CRIU restores (WARMSTART_CRIU__"
                        "MAX_CONCURRENT_RESTORES) and would answer past its deadline",
                        reason=Reason.STEP_TIMED_OUT,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(turn), min(left, WAIT_REPORT_SECONDS))
                if not turn.done() and waiting is not None:
                    reported = waiting(self._waiting.index(turn) + 1)
                    if reported is not None:
                        await reported
        except BaseException:
            if turn.done() and not turn.cancelled():
                self._release()  # handed a slot just as it gave up: pass it on
            else:
                turn.cancel()
                with contextlib.suppress(ValueError):
                    self._waiting.remove(turn)
            raise

    def _take(self) -> None:
        self._running += 1
        self._granted += 1
        self._peak = max(self._peak, self._running)

    def _release(self) -> None:
        self._running -= 1
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                self._take()
                turn.set_result(None)
                return
