"""Waiting in tests: on a condition with a deadline, never a bare sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

DEADLINE_S = 10.0


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Return once `condition()` holds; fail the test after DEADLINE_S seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
