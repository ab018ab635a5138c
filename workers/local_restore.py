"""`warmstart restore` through this node's worker: the CLI without the Temporal SDK.

A restore on this node is run by this node's worker, which already holds a connected
Temporal client (with the settings' TLS, API key and payload codec). Importing the SDK
costs the CLI more than the restore itself, so the CLI hands its arguments and settings to
that worker over a Unix socket in its home (`socket_path`) and prints what comes back; the
worker takes the same steps the CLI would (`workers.arguments.restore_request`, start,
follow) with its warm client, whose start is eager. Where no worker of this home and node
answers, or the worker's connection is not the one the CLI's settings describe, the CLI
takes the SDK path (docs/decisions/0035-cli-restore-fast-path.md).

Protocol: one JSON line from the CLI (`{"restore": {...}, "settings": {...}}`), then JSON
lines from the worker: `{"fallback": why}` (nothing was started), `{"started": {...}}`,
any number of `{"progress": text}`, and last `{"result": {"json": ..., "rows": ...}}` or
`{"error": {"code": n, "message": ...}}`.

Only the standard library at the top: the CLI imports this module (decision 0007).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.arguments import Answered

if TYPE_CHECKING:
    from temporalio.client import Client

    from workers.settings import Settings

log = logging.getLogger(__name__)

ENV_PREFIX = "WARMSTART_"
# A Unix socket's path is at most 107 bytes; a longer one is reached through its folder.
_SHORT_PATH = 100
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def socket_path(home: Path, node: str) -> Path:
    """Where the worker of `node` whose home is `home` listens (the folder is its user's)."""
    return home / "run" / f"node-{node}.sock"


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """`path` as a socket address: itself, or through an open descriptor of its folder when
    it is too long for one."""
    if len(os.fsencode(path)) < _SHORT_PATH:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


# --- the CLI's side: standard library only ---------------------------------------------


@dataclass(frozen=True)
class Started:
    name: str
    workflow_id: str
    run_id: str


@dataclass(frozen=True)
class Restored:
    """The restore's result as the CLI prints it: `-o json` and the table's rows."""

    json: str
    rows: dict[str, str]


def restore_through_worker(
    settings: Settings,
    environ: Mapping[str, str],
    restore: Mapping[str, Any],
    *,
    on_started: Callable[[Started], None],
    on_progress: Callable[[str], None],
) -> Restored | None:
    """Ask this node's worker to run the restore; None where no worker answers or it says
    the CLI's settings are not its own (nothing was started: the caller uses the SDK). A
    failed restore raises `Answered` with the exit code and message of the SDK path."""
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        try:
            with _reachable(socket_path(settings.home, settings.node.name)) as address:
                sock.connect(address)
        except OSError:  # no worker (no file, a stale one), or not ours to reach
            return None
        stream = stack.enter_context(sock.makefile("rwb"))
        ask = {
            "restore": dict(restore),
            "home": str(settings.home),
            "settings": {k: v for k, v in environ.items() if k.upper().startswith(ENV_PREFIX)},
        }
        try:
            stream.write(json.dumps(ask).encode() + b"\n")
            stream.flush()
        except OSError:
            return None
        started: Started | None = None
        for line in stream:
            message = json.loads(line)
            if "fallback" in message:
                return None
            if "started" in message:
                started = Started(**message["started"])
                on_started(started)
            elif "progress" in message:
                on_progress(message["progress"])
            elif "result" in message:
                return Restored(**message["result"])
            elif "error" in message:
                raise Answered(message["error"]["code"], message["error"]["message"])
    if started is None:
        return None  # the worker went away before it started anything
    from api.errors import UnavailableError

    raise UnavailableError(
        f"this node's worker went away while it ran workflow {started.workflow_id}; "
        f"`warmstart describe {started.name}` shows how the restore ended"
    )


# --- the node worker's side ------------------------------------------------------------


def _unfit(client: Client, own: Settings, cli: Settings) -> str:
    """Why the worker's client is not the one the CLI's settings describe ("" when it is):
    the SDK path then honours them as they are."""
    from dataclasses import replace

    if cli.home != own.home or cli.node.name != own.node.name:
        return "another home or node"
    if cli.telemetry.exporter != "off":
        return "traces are exported from the CLI's own client"
    theirs = replace(cli.temporal, ui_port=0, ui_host="")
    ours = replace(
        own.temporal,
        address=client.service_client.config.target_host,
        namespace=client.namespace,
        ui_port=0,
        ui_host="",
    )
    return "" if theirs == ours else "other Temporal connection settings"


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    """Only this worker's own user (or root) may ask it to restore."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    _, uid, _ = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return uid in (0, os.getuid())


async def _restore(client: Client, own: Settings, ask: dict[str, Any], send: _Send) -> None:
    from dataclasses import replace

    from temporalio.service import RPCError

    from api.errors import UnavailableError
    from workers import display
    from workers.arguments import exit_status, restore_request
    from workers.operations import follow, start_restore
    from workers.settings import Settings

    try:
        if Path(ask["home"]) != own.home:
            await send({"fallback": "another home"})
            return
        cli = replace(Settings.from_env(ask["settings"]), home=own.home)
        why = _unfit(client, own, cli)
        if why:
            await send({"fallback": why})
            return
        args = ask["restore"]
        request = await asyncio.to_thread(
            restore_request,
            cli,
            args["ref"],
            version=args["version"],
            timeout=args["timeout"],
            env=args["env"],
        )
        try:
            handle = await start_restore(client, request, key=args["key"])
        except RPCError as err:
            raise UnavailableError(
                f"the Temporal server at {cli.temporal.address} refused the restore ({err})"
            ) from err
        started = {"name": request.name, "workflow_id": handle.id}
        await send({"started": {**started, "run_id": handle.result_run_id or ""}})
        result = await follow(
            client,
            handle,
            lambda live: send.now({"progress": display.describe_progress(live)}),
            every=0.2,
        )
        rows = {key: str(value) for key, value in display.restore_rows(result).items()}
        await send({"result": {"json": result.model_dump_json(indent=2), "rows": rows}})
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as err:
        code, message = exit_status(err)
        await send({"error": {"code": code, "message": message}})


class _Send:
    """JSON lines to one CLI."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    def now(self, message: dict[str, Any]) -> None:
        self._writer.write(json.dumps(message).encode() + b"\n")

    async def __call__(self, message: dict[str, Any]) -> None:
        self.now(message)
        await self._writer.drain()


@contextlib.asynccontextmanager
async def serving_local_restores(client: Client, settings: Settings) -> AsyncIterator[None]:
    """Serve `warmstart restore` of this home and node on `socket_path` while the node
    worker runs (local mode only: on a cluster the node worker restores pods)."""
    if settings.node.cluster:
        yield
        return
    path = socket_path(settings.home, settings.node.name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if _answers(path):
        log.warning("%s: another worker of this home and node serves restores there", path)
        yield
        return
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            if not _peer_allowed(writer):
                return
            line = await reader.readline()
            if line:
                await _restore(client, settings, json.loads(line), _Send(writer))
        except (ConnectionError, ValueError, KeyError, TypeError) as err:
            log.warning("a local restore request ended early: %s", err)
        finally:
            handlers.discard(task)
            writer.close()

    with _reachable(path) as address:
        server = await asyncio.start_unix_server(handle, path=address)
    os.chmod(path, 0o600)
    try:
        yield
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await server.wait_closed()
        path.unlink(missing_ok=True)


def _answers(path: Path) -> bool:
    """Whether a live server listens at `path` (a file left by a dead worker does not)."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, _reachable(path) as address:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True
