"""A node's side of streamed restores (decision 0039): which files of a version stream, and
the page-source processes (`activities.storage.pagestream`) that serve them to CRIU's
lazy-pages daemon while they are fetched.

A restore of a version this node lacks, from S3, on a node set for it
(`WARMSTART_STORAGE__STREAM_RESTORES`, lazy restores on too), fetches every file but the
page images first (small: a 1 GiB worker's are a few MiB), verified as any download; the
page source then fetches the ranges `criu restore` itself reads, CRIU starts, and the rest
arrives on fault and in the background, each 1 MiB chunk checked against the version's
chunk table before it is served.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from activities.criu.command import IMAGES_DIR
from activities.storage.chunks import MIN_TABLE_SIZE, has_table, table_path
from activities.storage.objectstore.s3 import S3Connection, StoredObject
from activities.storage.pagestream import StreamedFile, StreamSpec
from api.errors import DigestMismatchError, StorageError, WarmstartError
from api.manifest import Manifest
from api.reasons import Reason

STATUS_FILE = "stream-status.json"
PAGE_SOURCE_LOG = "page-source.log"
# How long the page source may take to fetch what CRIU itself reads.
READY_SECONDS = 120.0
_KEPT_OUTCOMES = 64


def pick_streamed(manifest: Manifest, stored: list[StoredObject]) -> list[StoredObject]:
    """The page images of the version's images directory that can stream: stored plain, with
    their chunk table in the manifest. None where the version has parent images (pre-dumps:
    the lazy-pages daemon reads those itself, from files it expects whole)."""
    paths = {entry.path for entry in manifest.files}
    if any(path.startswith(f"{IMAGES_DIR}/parent/") for path in paths):
        return []
    return [
        item
        for item in stored
        if has_table(item.entry.path, item.entry.size)
        and PurePosixPath(item.entry.path).parent == PurePosixPath(IMAGES_DIR)
        and not item.compressed
        and table_path(item.entry.path) in paths
    ]


def why_not_streamed(manifest: Manifest, streamed: list[StoredObject]) -> str:
    """Why a version fetched for streaming has nothing to stream ("" when it has)."""
    if streamed:
        return ""
    pages = [e.path for e in manifest.files if has_table(e.path, e.size)]
    if not pages:
        return f"the version has no page image of {MIN_TABLE_SIZE >> 20} MiB or more"
    paths = {entry.path for entry in manifest.files}
    if not all(table_path(path) in paths for path in pages):
        return "the version has no chunk tables (committed before decision 0039)"
    if any(path.startswith(f"{IMAGES_DIR}/parent/") for path in paths):
        return "the version has pre-dump parent images"
    return "its page images are stored compressed"


@dataclass(frozen=True)
class StreamPlan:
    """A version whose other files are here (in `version_dir`, verified) and whose page
    images are still in the bucket."""

    manifest: Manifest
    version_dir: Path
    streamed: list[StoredObject]
    bucket: str
    connection: S3Connection
    location: str  # the node cache's key of the storage (`cache.location_key`)
    raw_manifest: bytes  # as stored: written last when the complete copy joins the cache


class PageStream:
    """One restore's page source, a process of its own (not a child that dies with the node
    worker: its restored process would read undelivered pages as zeros)."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        daemon_end: socket.socket,
        ready_fd: int,
        work_dir: Path,
    ) -> None:
        self.proc = proc
        self.daemon_end = daemon_end
        self._ready_fd = ready_fd
        self.work_dir = work_dir

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def status_file(self) -> Path:
        return self.work_dir / STATUS_FILE

    async def begin(
        self, plan: StreamPlan, *, pidfile: Path, background: bool, threads: int
    ) -> None:
        """Hand the page source its spec; it starts fetching what CRIU reads itself."""
        images = plan.version_dir / IMAGES_DIR
        spec = StreamSpec(
            images_dir=str(images),
            files=[
                StreamedFile(
                    name=PurePosixPath(item.entry.path).name,
                    key=item.key,
                    etag=item.etag,
                    size=item.entry.size,
                    table=str(plan.version_dir / table_path(item.entry.path)),
                )
                for item in plan.streamed
            ],
            bucket=plan.bucket,
            endpoint=plan.connection.endpoint,
            region=plan.connection.region,
            keys=plan.connection.keys,
            status_file=str(self.status_file),
            pidfile=str(pidfile),
            background=background,
            threads=threads,
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(spec.model_dump_json().encode())
        await self.proc.stdin.drain()
        self.proc.stdin.close()

    async def ready(self) -> None:
        """Until what CRIU reads itself is here and checked; the stream's error otherwise."""
        loop = asyncio.get_running_loop()
        readable: asyncio.Future[None] = loop.create_future()
        os.set_blocking(self._ready_fd, False)

        def wake() -> None:
            if not readable.done():
                readable.set_result(None)

        loop.add_reader(self._ready_fd, wake)
        try:
            await asyncio.wait_for(readable, READY_SECONDS)
            said = os.read(self._ready_fd, 1)
        except TimeoutError:
            raise StorageError(
                f"the page source did not fetch the restore's own pages within {READY_SECONDS:g} s"
            ) from None
        finally:
            loop.remove_reader(self._ready_fd)
        if said != b"\0":
            await self.proc.wait()
            raise self.error() or StorageError(
                f"the page source exited with {self.proc.returncode} before CRIU could start"
                f"{self._log_tail()}"
            )

    def status(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.status_file.read_text()))
        except (OSError, ValueError):
            return {}

    def error(self) -> WarmstartError | None:
        """The stream's failure as the error it was, if it failed."""
        failed = str(self.status().get("failed") or "")
        if not failed:
            return None
        if failed.startswith(f"{Reason.DIGEST_MISMATCH}: "):
            return DigestMismatchError(failed.removeprefix(f"{Reason.DIGEST_MISMATCH}: "))
        return StorageError(f"streaming the page images failed: {failed}")

    async def wait(self, timeout: float) -> dict[str, Any]:
        """Until the page source has exited (killed after `timeout`); its status."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            await self.kill()
        return self.status()

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        self.close()

    def close(self) -> None:
        """Drop this worker's ends (the daemon and the page source hold their own)."""
        self.daemon_end.close()
        with contextlib.suppress(OSError):
            os.close(self._ready_fd)

    def _log_tail(self) -> str:
        try:
            text = (self.work_dir / PAGE_SOURCE_LOG).read_text(errors="replace").strip()
        except OSError:
            return ""
        return f":\n{text[-2000:]}" if text else ""


class PageStreams:
    """Whether this node streams restores of versions it lacks, and how."""

    def __init__(self, *, enabled: bool, background: bool = True, threads: int = 8) -> None:
        """`background`: fetch the pages nobody asked for yet (off: only on fault, as the
        tests show); `threads`: ranged GETs at a time."""
        self.enabled = enabled
        self.background = background
        self.threads = threads
        self.outcomes: dict[int, dict[str, Any]] = {}  # page source PID → its last status

    def ended(self, stream: PageStream, status: dict[str, Any]) -> None:
        self.outcomes[stream.pid] = status
        while len(self.outcomes) > _KEPT_OUTCOMES:
            del self.outcomes[next(iter(self.outcomes))]

    async def start(self, work_dir: Path) -> PageStream:
        """A page source waiting for its spec: started before the version's files are
        fetched, so that its start-up (Python, boto3) overlaps them."""
        work_dir.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon_end = ours
        read_end, write_end = os.pipe()
        try:
            with (work_dir / PAGE_SOURCE_LOG).open("ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "activities.storage.pagestream",
                    "--socket",
                    str(theirs.fileno()),
                    "--ready-fd",
                    str(write_end),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                    pass_fds=(theirs.fileno(), write_end),
                )
        except BaseException:
            ours.close()
            os.close(read_end)
            raise
        finally:
            theirs.close()
            os.close(write_end)
        return PageStream(proc, daemon_end, read_end, work_dir)
