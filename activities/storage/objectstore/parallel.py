"""Thread pools for transfers: the first failure stops the rest, queued work is dropped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any


class FirstFailure:
    """Remembers the first exception of the futures it watches, for the producer to raise."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._error: BaseException | None = None

    def watch(self, future: Future[Any]) -> None:
        future.add_done_callback(self._note)

    def _note(self, future: Future[Any]) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            with self._lock:
                self._error = self._error or error

    def check(self) -> None:
        if self._error is not None:
            raise self._error


@contextmanager
def worker_pool(workers: int, *, name: str) -> Iterator[ThreadPoolExecutor]:
    """A pool that, when the block fails, drops queued work and waits for running work
    (so nothing of this attempt still writes while a retry starts)."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=name)
    try:
        yield pool
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def results(futures: list[Future[Any]]) -> None:
    """Wait for all of `futures`, raising the first failure."""
    for future in futures:
        future.result()
