"""Lazy restore: the restored process resumes before its memory is back; CRIU's lazy-pages
daemon serves each page on fault (userfaultfd) and the rest in the background, then exits.

`LazyPages` is a node's side of it (decision 0034): whether restores ask for it, the probe
of whether this kernel and CRIU can (`criu check --feature uffd-noncoop`, asked once), and
every daemon it started, tracked by PID until it exits: by itself once every page is
delivered, killed when its restore fails or its restored process is gone. A daemon does not
die with the node worker: a process whose page server died would read the pages not yet
delivered as zeros, so a daemon serving a restored process finishes on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from activities.criu.command import LAZY_PAGES_LOG, Criu, Probe, feature_probe, log_errors
from activities.host.files import tail
from activities.host.processes import is_alive, start_ticks
from api.errors import RestoreFailedError

logger = logging.getLogger(__name__)

# What a lazy restore needs from the kernel: userfaultfd with the events of a non-cooperative
# process (fork, mremap, munmap, exit), which CRIU's lazy-pages daemon handles.
LAZY_FEATURE = "uffd-noncoop"
# How long a daemon may take to listen, and how long it may outlive its restored process.
READY_SECONDS = 10.0
ORPHAN_GRACE_SECONDS = 5.0
_WATCH_SECONDS = 1.0
_PAGE_FAULT = re.compile(r"#PF at ")
_TRANSFERRED = re.compile(r"UFFD transferred pages: \((\d+)/(\d+)\)")
_KEPT_OUTCOMES = 64


def criu_probe(criu: Criu) -> Probe:
    """Ask `criu check --feature uffd-noncoop` once, on first use."""
    return feature_probe(criu, LAZY_FEATURE)


@dataclass(frozen=True)
class LazyOutcome:
    """How a lazy-pages daemon ended: its exit status (negative: killed by that signal), the
    page faults it served and the pages it transferred of all it had, from its log."""

    pid: int
    returncode: int
    faults: int
    transferred: int
    total: int
    seconds: float

    @property
    def complete(self) -> bool:
        return self.returncode == 0 and self.total > 0 and self.transferred == self.total


class LazyPagesDaemon:
    """One restore's `criu lazy-pages`, a child of this process: listening in its work
    directory once `start` returns."""

    def __init__(self, proc: asyncio.subprocess.Process, work_dir: Path) -> None:
        self.proc = proc
        self.work_dir = work_dir
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()

    def outcome(self) -> LazyOutcome:
        """Read once it has exited."""
        try:
            text = tail(self.work_dir / LAZY_PAGES_LOG, lines=1 << 20, max_bytes=64 << 20)
        except OSError:
            text = ""
        counts = _TRANSFERRED.findall(text)
        transferred, total = (int(n) for n in counts[-1]) if counts else (0, 0)
        return LazyOutcome(
            pid=self.pid,
            returncode=self.proc.returncode if self.proc.returncode is not None else -1,
            faults=len(_PAGE_FAULT.findall(text)),
            transferred=transferred,
            total=total,
            seconds=round(time.monotonic() - self.started, 4),
        )


class LazyPages:
    """Whether this node's restores serve memory lazily, and the daemons doing it."""

    def __init__(self, *, criu: Criu, enabled: bool, probe: Probe | None = None) -> None:
        self._criu = criu
        self.enabled = enabled
        self._probe = probe or criu_probe(criu)
        self.running: dict[int, LazyPagesDaemon] = {}
        self.outcomes: dict[int, LazyOutcome] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def unavailable(self) -> str:
        """Why a lazy restore cannot run here ("" when it can)."""
        return self._probe()

    async def start(
        self, *, images_dir: Path, work_dir: Path, page_server_fd: int = -1
    ) -> LazyPagesDaemon:
        """A daemon listening in `work_dir`; RestoreFailedError (with its log) if it did not
        come up within `READY_SECONDS`. `page_server_fd`: the socket of the page source
        that serves its pages (a streamed restore), else it reads them from `images_dir`."""
        work_dir.mkdir(parents=True, exist_ok=True)
        read_end, write_end = os.pipe()
        remote = (page_server_fd,) if page_server_fd >= 0 else ()
        try:
            command = self._criu.lazy_pages_command(
                images_dir=images_dir,
                work_dir=work_dir,
                status_fd=write_end,
                page_server_fd=page_server_fd,
            )
            proc = await asyncio.create_subprocess_exec(
                *command,  # not `dies_with_worker`: see the module's docstring
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=(write_end, *remote),
            )
        finally:
            os.close(write_end)
        daemon = LazyPagesDaemon(proc, work_dir)
        self.running[daemon.pid] = daemon
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()
        os.set_blocking(read_end, False)

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(read_end, wake)
        try:
            await asyncio.wait_for(readable, READY_SECONDS)
            ready = os.read(read_end, 1)  # a byte once it listens, nothing if it exited
        except TimeoutError:
            await self.stop(daemon)
            raise RestoreFailedError(
                f"criu lazy-pages did not listen within {READY_SECONDS:g} s"
            ) from None
        except BaseException:
            await self.stop(daemon)
            raise
        finally:
            loop.remove_reader(read_end)
            os.close(read_end)
        if ready != b"\0":
            await self.stop(daemon)
            detail = log_errors(work_dir / LAZY_PAGES_LOG) or "(no log lines)"
            raise RestoreFailedError(
                f"criu lazy-pages exited with {daemon.proc.returncode} before it listened:\n"
                f"{detail}"
            )
        return daemon

    async def stop(self, daemon: LazyPagesDaemon) -> LazyOutcome:
        """Kill it (a failed restore: nothing is left to serve) and reap it."""
        await daemon.kill()
        return self._ended(daemon)

    def hand_over(
        self,
        daemon: LazyPagesDaemon,
        *,
        restored_pid: int,
        done: Callable[[LazyOutcome], Awaitable[None]],
    ) -> None:
        """A restore succeeded: reap the daemon once it has delivered every page, or kill it
        once the restored process is gone for `ORPHAN_GRACE_SECONDS`; then `done`."""
        task = asyncio.get_running_loop().create_task(self._watch(daemon, restored_pid, done))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def wait_idle(self, timeout: float) -> None:
        """Until every daemon handed over has ended (and its `done` ran)."""
        if self._watchers:
            await asyncio.wait_for(asyncio.gather(*self._watchers), timeout)

    async def _watch(
        self,
        daemon: LazyPagesDaemon,
        restored_pid: int,
        done: Callable[[LazyOutcome], Awaitable[None]],
    ) -> None:
        ticks = start_ticks(restored_pid)
        gone_since: float | None = None
        try:
            while daemon.proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(daemon.proc.wait()), _WATCH_SECONDS)
                    break
                alive = is_alive(restored_pid) and start_ticks(restored_pid) == ticks
                if alive:
                    gone_since = None
                elif gone_since is None:
                    gone_since = time.monotonic()
                elif time.monotonic() - gone_since > ORPHAN_GRACE_SECONDS:
                    logger.warning(
                        "lazy-pages daemon %d outlived restored pid %d; killing it",
                        daemon.pid,
                        restored_pid,
                    )
                    await daemon.kill()
        except BaseException:
            # The worker stops: the daemon goes on serving its process and exits on its own
            # (killing it would leave the pages not yet delivered reading as zeros).
            logger.warning(
                "node worker stopping: lazy-pages daemon %d of restored pid %d left serving",
                daemon.pid,
                restored_pid,
            )
            raise
        finally:
            if daemon.proc.returncode is None:  # left serving (above): nothing to report
                self.running.pop(daemon.pid, None)
            else:
                await self._report(daemon, restored_pid, done)

    async def _report(
        self,
        daemon: LazyPagesDaemon,
        restored_pid: int,
        done: Callable[[LazyOutcome], Awaitable[None]],
    ) -> None:
        outcome = self._ended(daemon)
        logger.info(
            "lazy-pages daemon %d of restored pid %d ended with %d after %.3f s: "
            "%d page faults served, %d of %d pages transferred",
            outcome.pid,
            restored_pid,
            outcome.returncode,
            outcome.seconds,
            outcome.faults,
            outcome.transferred,
            outcome.total,
        )
        await done(outcome)

    def _ended(self, daemon: LazyPagesDaemon) -> LazyOutcome:
        self.running.pop(daemon.pid, None)
        outcome = daemon.outcome()
        self.outcomes[daemon.pid] = outcome
        while len(self.outcomes) > _KEPT_OUTCOMES:
            del self.outcomes[next(iter(self.outcomes))]
        return outcome
