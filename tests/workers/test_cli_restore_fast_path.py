"""`warmstart restore` through this node's worker (docs/decisions/0035): the CLI imports no
Temporal SDK, prints what the SDK path prints, fails with the SDK path's messages, and
takes the SDK path where no worker answers or the worker's connection is not the one its
settings describe."""

from __future__ import annotations

import json
import socket
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.host.processes import terminate
from activities.storage.store import CheckpointStore
from tests.committing import commit_version
from tests.conftest import needs_criu
from tests.workers.test_cli import PROGRAMS, cli
from workers.local_restore import socket_path
from workers.ports import free_port
from workers.settings import Settings

PROFILE = {"PYTHONPROFILEIMPORTTIME": "1"}
# Another client identity: the node worker's connection is then not the CLI's.
OTHER_IDENTITY = {**PROFILE, "WARMSTART_TEMPORAL__IDENTITY": "cli-of-this-test"}


@pytest.fixture
def address(temporal_env: WorkflowEnvironment) -> str:
    return temporal_env.client.service_client.config.target_host


def imported(err: str) -> set[str]:
    """The modules a CLI run imported (Python's import-time report on stderr)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in err.splitlines()
        if line.startswith("import time:") and "|" in line
    }


def said(err: str) -> str:
    """What the CLI itself wrote on stderr (without the import-time report)."""
    return "\n".join(line for line in err.splitlines() if not line.startswith("import time:"))


def sdk(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in ("temporalio", "pydantic")}


async def _capture_tokens(settings: Settings, address: str) -> tuple[str, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    code, out, err = await cli(
        settings, address, "capture", "tokens", "--ready-http", url, "-o", "json", "--",
        "python3", str(PROGRAMS / "token_server.py"), str(port),
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out)["checkpoint_id"], url


def _answers(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


@needs_criu
async def test_restore_through_the_node_worker_imports_no_sdk(
    workers: Settings, address: str
) -> None:
    checkpoint_id, url = await _capture_tokens(workers, address)

    code, out, err = await cli(workers, address, "restore", "tokens", "-o", "json", env=PROFILE)
    assert code == 0, said(err)
    fast = json.loads(out)
    try:
        assert fast["checkpoint_id"] == checkpoint_id and fast["node"] == workers.node.name
        assert "restore tokens: workflow restore/local/tokens/" in said(err)
        modules = imported(err)
        assert "workers.local_restore" in modules  # the report is there and it took this path
        assert sdk(modules) == set(), sorted(sdk(modules))
        token = _answers(url)
    finally:
        await terminate(fast["pid"], grace_seconds=1)

    code, out, err = await cli(workers, address, "restore", checkpoint_id, env=PROFILE)
    assert code == 0, said(err)
    rows = dict(line.split(None, 1) for line in out.replace("checkpoint ID", "id").splitlines())
    try:
        assert rows["id"] == checkpoint_id and rows["node"] == workers.node.name
        assert "restore stages" in out and "steps" in rows
        assert sdk(imported(err)) == set()
        assert _answers(url) == token  # the same process state, restored again
    finally:
        await terminate(int(rows["pid"]), grace_seconds=1)

    # The worker's client is not the one these settings describe: the SDK path, same output.
    code, out, err = await cli(
        workers, address, "restore", "tokens", "-o", "json", env=OTHER_IDENTITY
    )
    assert code == 0, said(err)
    slow = json.loads(out)
    try:
        assert "temporalio.client" in imported(err)
        assert "restore tokens: workflow restore/local/tokens/" in said(err)
        assert slow.keys() == fast.keys() and slow["checkpoint_id"] == checkpoint_id
        assert _answers(url) == token
    finally:
        await terminate(slow["pid"], grace_seconds=1)


@needs_criu
async def test_failures_through_the_node_worker_say_what_the_sdk_path_says(
    workers: Settings, address: str
) -> None:
    cases = [
        (["restore", "nosuch"], 1, "error: [CheckpointNotFound] no committed checkpoint named "
         "or with ID 'nosuch'"),
        (["restore", "x", "--timeout", "0"], 2, "error: --timeout 0: Input should be greater "
         "than 0"),
        (["restore", "x", "--env", "HF_TOKEN=t"], 2, "error: --env HF_TOKEN: a restored "
         "process keeps the environment it was captured with"),
    ]  # fmt: skip
    for args, status, message in cases:
        code, _, err = await cli(workers, address, *args, env=PROFILE)
        assert (code, sdk(imported(err))) == (status, set()), said(err)
        assert message in said(err)
        code, _, err = await cli(workers, address, *args, env=OTHER_IDENTITY)
        assert code == status and message in said(err)
        assert "Traceback" not in err

    # A committed version that is no CRIU image: the restore workflow fails on the node.
    store = CheckpointStore(workers.checkpoint_root)
    commit_version(store, model="broken", created_at=datetime(2026, 12, 1, tzinfo=UTC))
    code, _, fast = await cli(workers, address, "restore", "broken", env=PROFILE)
    assert (code, sdk(imported(fast))) == (1, set()), said(fast)
    code, _, slow = await cli(workers, address, "restore", "broken", env=OTHER_IDENTITY)
    assert code == 1 and "temporalio.client" in imported(slow)
    [fast_error] = [line for line in said(fast).splitlines() if line.startswith("error: [")]
    [slow_error] = [line for line in said(slow).splitlines() if line.startswith("error: [")]
    assert fast_error.split("]")[0] == slow_error.split("]")[0], (fast_error, slow_error)
    assert "Traceback" not in fast + slow


async def test_without_a_worker_or_server_the_sdk_path_says_how_to_start_one(
    settings: Settings,
) -> None:
    commit_version(
        CheckpointStore(settings.checkpoint_root),
        model="lonely",
        created_at=datetime(2026, 12, 1, tzinfo=UTC),
    )
    # A socket file a dead worker left behind: nobody answers there.
    path = socket_path(settings.home, settings.node.name)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    assert path.is_socket()
    code, _, err = await cli(settings, f"127.0.0.1:{free_port()}", "restore", "lonely")
    assert code == 1
    assert "no Temporal server at" in err and "warmstart dev" in err


@needs_criu
async def test_the_socket_is_the_worker_users_alone(workers: Settings) -> None:
    path = socket_path(workers.home, workers.node.name)
    assert path.is_socket()
    assert path.stat().st_mode & 0o777 == 0o600
    assert Path(path.parent).stat().st_mode & 0o077 == 0
