"""The page source of a streamed restore: a process that serves CRIU's lazy-pages daemon the
pages of a version still being fetched from the bucket (decision 0039).

Run by the node worker as `python -m activities.storage.pagestream --socket FD --ready-fd FD`
with its spec (`StreamSpec`, JSON) on stdin. It
1. makes each page image a sparse file of its full size in the images directory, then
   fetches, first, the ranges `criu restore` itself reads (the pages that are not lazy),
   and writes a byte to the ready fd: CRIU may start;
2. fetches the rest in the background, in order, several ranged GETs at a time (each pinned
   to the ETag listed when the restore began);
3. answers the daemon's requests (CRIU's page-server protocol on the socket it shares with
   the daemon, `criu lazy-pages --page-server --ps-socket`): a page whose chunk is here is
   sent from the file; one that is not has its chunks fetched ahead of the background ones.

Every chunk (1 MiB) is checked against the version's chunk table before any of its bytes is
sent or counted as fetched. A chunk that does not match, or that cannot be fetched, ends the
stream: the restored tree (CRIU's pidfile names its root) is killed before the daemon's
socket closes, because a process whose page source is gone reads the pages not yet delivered
as zeros. The outcome is written to the status file (JSON) either way.

It does not die with the node worker, for the same reason as the daemon (decision 0034): it
exits once every chunk is fetched and the daemon has said goodbye, or the daemon is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from activities.criu.pagemap import PE_PRESENT, Pagemap, read_pagemaps, restore_reads
from activities.storage.chunks import ChunkTable
from api.errors import DigestMismatchError, WarmstartError

# CRIU's page-server protocol (criu/page-xfer.c): a request or answer header is
# {u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id} with natural alignment (32 bytes).
_HEADER = struct.Struct("<I4xQQQ")
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024
_PS_CMD_BITS = 16
# Chunks one background GET brings (16 MiB: few requests, each still a small share of a
# large image), and the attempts at a range before giving up.
GROUP_CHUNKS = 16
MAX_FILL_CHUNKS = 64
ATTEMPTS = 3
# GETs at a time for what the daemon asks for (beside the fill's).
ASKED_THREADS = 4
# How long, after the stream failed, to wait for CRIU's pidfile (a restore still running).
KILL_WAIT_SECONDS = 30.0


class StreamedFile(BaseModel):
    """A page image to stream: its name in the images directory, its object, its table."""

    name: str
    key: str
    etag: str
    size: int
    table: str  # path of its chunk table (already fetched and verified)


class StreamSpec(BaseModel):
    images_dir: str
    files: list[StreamedFile]
    bucket: str
    endpoint: str = ""
    region: str = ""
    keys: dict[str, str] = {}
    status_file: str
    pidfile: str  # where CRIU writes the restored root's PID
    background: bool = True
    threads: int = 8


@dataclass(frozen=True)
class _Request:
    """A PS_IOV_GET of the daemon: where its pages lie in which page image, in which chunks."""

    dst_id: int
    vaddr: int
    nr_pages: int
    name: str
    spans: list[tuple[int, int]]
    chunks: list[int]


@dataclass
class _File:
    spec: StreamedFile
    table: ChunkTable
    fd: int
    ready: list[threading.Event] = field(default_factory=list)
    claimed: set[int] = field(default_factory=set)


class PageSource:
    """The chunks of every streamed page image: which are here, fetching the others."""

    def __init__(self, spec: StreamSpec, client: Any) -> None:
        self.spec = spec
        self._client = client
        self._lock = threading.Lock()
        self.failed = ""
        self.failed_event = threading.Event()
        self.counts = {"on_demand": 0, "background": 0, "bytes": 0, "requests": 0}
        self.started = time.monotonic()
        self.ready_seconds = 0.0
        self.complete_seconds = 0.0
        images = Path(spec.images_dir)
        self.files: dict[str, _File] = {}
        for streamed in spec.files:
            table = ChunkTable.read(Path(streamed.table))
            if table.size != streamed.size:
                raise DigestMismatchError(
                    f"{streamed.name}: its chunk table is of {table.size} bytes, the object "
                    f"holds {streamed.size}"
                )
            fd = os.open(images / streamed.name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.ftruncate(fd, streamed.size)
            events = [threading.Event() for _ in range(table.chunks)]
            self.files[streamed.name] = _File(streamed, table, fd, events)
        self.pagemaps: dict[int, Pagemap] = {
            key[1]: pagemap for key, pagemap in read_pagemaps(images).items() if key[0] == "task"
        }
        # The background fill's GETs, and those of pages the daemon asks for: these never
        # queue behind the fill's.
        self._pool = ThreadPoolExecutor(max(1, spec.threads), thread_name_prefix="fill")
        self._asked = ThreadPoolExecutor(ASKED_THREADS, thread_name_prefix="asked")
        self._asking = 0  # asked-for GETs not yet done

    # -- fetching ---------------------------------------------------------------------------

    def claim(self, name: str, chunks: range) -> list[range]:
        """The runs of `chunks` nobody fetches yet, now claimed by the caller."""
        held = self.files[name]
        runs: list[range] = []
        with self._lock:
            start = None
            for index in chunks:
                free = index not in held.claimed
                if free:
                    held.claimed.add(index)
                    start = index if start is None else start
                elif start is not None:
                    runs.append(range(start, index))
                    start = None
            if start is not None:
                runs.append(range(start, chunks.stop))
        return runs

    def fetch(self, name: str, chunks: range, *, on_demand: bool) -> None:
        """GET chunks [first, last] of `name` in one ranged request, check each, write it."""
        held = self.files[name]
        offset = held.table.span(chunks.start)[0]
        last_offset, last_length = held.table.span(chunks.stop - 1)
        end = last_offset + last_length - 1
        where = f"s3://{self.spec.bucket}/{held.spec.key}"
        data = b""
        for attempt in range(ATTEMPTS):
            try:
                answer = self._client.get_object(
                    Bucket=self.spec.bucket,
                    Key=held.spec.key,
                    Range=f"bytes={offset}-{end}",
                    IfMatch=held.spec.etag,
                )
                data = answer["Body"].read()
                break
            except Exception as err:
                if attempt + 1 == ATTEMPTS:
                    raise WarmstartError(
                        f"{where}: bytes {offset}-{end} could not be fetched: {err}"
                    ) from err
                time.sleep(0.1 * (attempt + 1))
        view = memoryview(data)
        for index in chunks:
            at, length = held.table.span(index)
            piece = view[at - offset : at - offset + length]
            held.table.check(index, piece, where=where)
            os.pwrite(held.fd, piece, at)
            held.ready[index].set()
        with self._lock:
            self.counts["on_demand" if on_demand else "background"] += len(chunks)
            self.counts["bytes"] += len(data)

    def fetch_claimed(self, name: str, chunks: range, *, on_demand: bool) -> None:
        try:
            self.fetch(name, chunks, on_demand=on_demand)
        except BaseException as err:  # the stream cannot go on
            self.fail(err)
            raise

    def ask(
        self, name: str, spans: list[tuple[int, int]], *, gap: int = 0, urgent: bool = True
    ) -> list[int]:
        """Start fetching, ahead of the background fill, the chunks of `name` holding
        `spans` that nobody fetches yet: chunks less than `gap` apart in one GET. While
        `urgent` ones are on their way the fill starts no GET. Returns the chunks needed."""
        held = self.files[name]
        needed = sorted({c for at, size in spans for c in held.table.covering(at, size)})
        runs: list[range] = []
        for index in needed:
            if runs and index - runs[-1].stop <= gap:
                runs[-1] = range(runs[-1].start, index + 1)
            else:
                runs.append(range(index, index + 1))
        for wanted in runs:
            for run in self.claim(name, wanted):
                if urgent:
                    with self._lock:
                        self._asking += 1
                self._asked.submit(self._fetch_asked, name, run, urgent)
        return needed

    def _fetch_asked(self, name: str, chunks: range, urgent: bool) -> None:
        try:
            self.fetch_claimed(name, chunks, on_demand=True)
        finally:
            if urgent:
                with self._lock:
                    self._asking -= 1

    def wait(self, name: str, chunks: list[int]) -> None:
        """Until those chunks of `name` are here and checked; the stream's error if it
        failed meanwhile."""
        held = self.files[name]
        for index in chunks:
            while not held.ready[index].wait(0.05):
                if self.failed:
                    raise WarmstartError(self.failed)

    def background(self) -> None:
        """Fetch every chunk nobody has claimed, in order, `threads` GETs at a time."""
        futures = []
        for name, held in self.files.items():
            # A large image in ranges of up to 64 MiB (at most ~16 GETs of it, as a
            # download's parts): a server's cost per request is then a small share.
            step = min(max(GROUP_CHUNKS, held.table.chunks // 16), MAX_FILL_CHUNKS)
            for first in range(0, held.table.chunks, step):
                if self.failed:
                    return
                group = range(first, min(first + step, held.table.chunks))
                for run in self.claim(name, group):
                    futures.append(
                        self._pool.submit(self.fetch_claimed, name, run, on_demand=False)
                    )
                # `threads` GETs at a time, and none started while asked-for chunks are
                # on their way: the fill yields the bucket's bandwidth to what is waited for.
                while self._asking or sum(not f.done() for f in futures) >= self.spec.threads:
                    time.sleep(0.002)
        for future in futures:
            with contextlib.suppress(BaseException):
                future.result()

    def all_here(self) -> bool:
        return all(e.is_set() for held in self.files.values() for e in held.ready)

    def fail(self, err: BaseException) -> None:
        with self._lock:
            if self.failed:
                return
            reason = getattr(err, "reason", None)
            prefix = f"{reason}: " if reason else ""
            self.failed = f"{prefix}{err}"
        self.failed_event.set()

    # -- answering the daemon ---------------------------------------------------------------

    def request(self, dst_id: int, vaddr: int, nr_pages: int) -> _Request:
        """A request of the daemon, its chunks asked for at once. A page fault asks for one
        page: its chunk alone, urgent. The daemon's own background requests (up to 4 MiB)
        ask for whole groups, as the fill would, where the fill has not yet."""
        pagemap = self.pagemaps.get(dst_id)
        if pagemap is None:
            raise WarmstartError(f"the lazy-pages daemon asked for pages of unknown task {dst_id}")
        spans = pagemap.locate(vaddr, nr_pages)
        name = pagemap.pages_file
        if name not in self.files:
            raise WarmstartError(f"{name} is not streamed")
        if nr_pages == 1:
            chunks = self.ask(name, spans)
        else:
            table = self.files[name].table
            group = table.chunk_size * GROUP_CHUNKS
            grown = [
                (at // group * group, -(-(at + size) // group) * group - at // group * group)
                for at, size in spans
            ]
            self.ask(name, [(at, min(size, table.size - at)) for at, size in grown], urgent=False)
            chunks = sorted({c for at, size in spans for c in table.covering(at, size)})
        return _Request(dst_id, vaddr, nr_pages, name, spans, chunks)

    def answer(self, sock: socket.socket, asked: _Request) -> None:
        self.wait(asked.name, asked.chunks)
        with self._lock:
            self.counts["requests"] += 1
        cmd = (PE_PRESENT << _PS_CMD_BITS) | PS_IOV_ADD_F
        sock.sendall(_HEADER.pack(cmd, asked.nr_pages, asked.vaddr, asked.dst_id))
        fd = self.files[asked.name].fd
        for offset, length in asked.spans:
            sent = 0
            while sent < length:
                sent += os.sendfile(sock.fileno(), fd, offset + sent, length - sent)

    def serve(self, sock: socket.socket) -> None:
        """Answer the daemon until it says goodbye or goes; raise when the stream failed.
        Requests are read as they come and their chunks asked for at once; answers go in
        their order (the protocol's), so a request waiting for its chunk does not hold up
        the fetch of the next one's."""
        answers: queue.Queue[_Request | None] = queue.Queue()
        answering = threading.Thread(
            target=self._answer_all, args=(sock, answers), name="answer", daemon=True
        )
        answering.start()
        try:
            while True:
                header = _recv_exactly(sock, _HEADER.size)
                if header is None:
                    return  # the daemon is gone (it exits once every page is delivered)
                cmd, nr_pages, vaddr, dst_id = _HEADER.unpack(header)
                if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                    answers.put(None)
                    answering.join()
                    sock.sendall(struct.pack("<i", 0))
                    return
                if cmd & ((1 << _PS_CMD_BITS) - 1) != PS_IOV_GET:
                    raise WarmstartError(f"the lazy-pages daemon sent command {cmd:#x}")
                answers.put(self.request(dst_id, vaddr, nr_pages))
        finally:
            answers.put(None)

    def _answer_all(self, sock: socket.socket, answers: queue.Queue[_Request | None]) -> None:
        try:
            while (asked := answers.get()) is not None:
                self.answer(sock, asked)
        except BaseException as err:
            self.fail(err)

    def status(self, *, complete: bool) -> dict[str, Any]:
        with self._lock:
            counts = dict(self.counts)
        return {
            "complete": complete,
            "failed": self.failed,
            "chunks": sum(held.table.chunks for held in self.files.values()),
            **counts,
            "ready_seconds": round(self.ready_seconds, 4),
            "complete_seconds": round(self.complete_seconds, 4),
            "seconds": round(time.monotonic() - self.started, 4),
        }


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        try:
            piece = sock.recv(size - len(data))
        except ConnectionResetError:
            return None
        if not piece:
            return None
        data += piece
    return data


def _kill_tree(root: int) -> None:
    """SIGKILL `root` and every process below it (stopped first, so none forks meanwhile)."""
    from activities.host.processes import children

    tree = [root]
    at = 0
    while at < len(tree):
        with contextlib.suppress(ProcessLookupError):
            os.kill(tree[at], signal.SIGSTOP)
        tree.extend(children(tree[at]))
        at += 1
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class _Restored:
    """The restored tree's root, once CRIU's pidfile names it, with its start time (read at
    once, so that a PID reused after the process ended is never taken for it)."""

    def __init__(self, pidfile: Path) -> None:
        self._pidfile = pidfile
        self.found: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="restored", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        from activities.host.processes import start_ticks

        while not self._stop.wait(0.02):
            with contextlib.suppress(OSError, ValueError):
                pid = int(self._pidfile.read_text().strip())
                self.found = (pid, start_ticks(pid))
                return

    def kill(self, deadline: float) -> None:
        """Kill the tree (waiting for CRIU to name it until `deadline`)."""
        from activities.host.processes import start_ticks

        while self.found is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self._stop.set()
        if self.found is not None:
            pid, ticks = self.found
            if ticks and start_ticks(pid) == ticks:
                _kill_tree(pid)


def _write_status(path: Path, status: dict[str, Any]) -> None:
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps(status))
    os.replace(temp, path)


def _client(spec: StreamSpec) -> Any:
    import boto3

    from activities.storage.objectstore.s3calls import client_config
    from activities.storage.objectstore.transfer import TransferSettings

    return boto3.session.Session().client(
        "s3",
        endpoint_url=spec.endpoint or None,
        region_name=spec.region or None,
        config=client_config(TransferSettings()),
        aws_access_key_id=spec.keys.get("aws_access_key_id"),
        aws_secret_access_key=spec.keys.get("aws_secret_access_key"),
        aws_session_token=spec.keys.get("aws_session_token"),
    )


def run(spec: StreamSpec, sock: socket.socket, ready_fd: int) -> int:
    status_file = Path(spec.status_file)
    restored = _Restored(Path(spec.pidfile))
    source: PageSource | None = None
    try:
        source = PageSource(spec, _client(spec))
        eager = restore_reads(read_pagemaps(Path(spec.images_dir)))
        needed = {
            name: source.ask(name, eager.get(name, []), gap=GROUP_CHUNKS) for name in source.files
        }
        for name, chunks in needed.items():
            source.wait(name, chunks)
        source.ready_seconds = time.monotonic() - source.started
    except BaseException as err:
        if source is not None:
            source.fail(err)
            status = source.status(complete=False)
        else:
            reason = getattr(err, "reason", None)
            status = {"complete": False, "failed": f"{reason + ': ' if reason else ''}{err}"}
        _write_status(status_file, status)
        return 3
    os.write(ready_fd, b"\0")
    os.close(ready_fd)
    if spec.background:
        filler = threading.Thread(target=source.background, name="stream-fill", daemon=True)
        filler.start()
    else:
        filler = None
    served = threading.Thread(target=_serve, args=(source, sock), name="serve", daemon=True)
    served.start()
    # Until every chunk is here (or the stream failed), then until the daemon is done.
    while not source.failed and not source.all_here():
        if filler is None and not served.is_alive():
            break  # nothing left to ask for it
        source.failed_event.wait(0.05)
    if source.all_here():
        source.complete_seconds = time.monotonic() - source.started
        _write_status(status_file, source.status(complete=True))
    if source.failed:
        # Said first (whoever sees the process die reads why), then: never leave a process
        # to read zeros where its pages were not delivered.
        _write_status(status_file, source.status(complete=False))
        restored.kill(time.monotonic() + KILL_WAIT_SECONDS)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        return 4
    served.join()
    _write_status(status_file, source.status(complete=source.all_here()))
    return 0 if source.all_here() else 5


def _serve(source: PageSource, sock: socket.socket) -> None:
    try:
        source.serve(sock)
    except BaseException as err:
        source.fail(err)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m activities.storage.pagestream")
    parser.add_argument("--socket", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.socket)
    spec = StreamSpec.model_validate_json(sys.stdin.buffer.read())
    return run(spec, sock, args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
