"""The `warmstart` CLI as a user runs it: a separate process talking to the dev server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.host.processes import terminate
from tests.conftest import needs_criu
from workers.ports import free_port
from workers.settings import Settings

WARMSTART = str(Path(sys.executable).parent / "warmstart")
PROGRAMS = Path(__file__).resolve().parents[1] / "programs"


async def cli(settings: Settings, address: str, *args: str) -> tuple[int, str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(settings.home),
        "WARMSTART_HOME": str(settings.home),
        "WARMSTART_TEMPORAL__ADDRESS": address,
        "WARMSTART_NODE__NAME": settings.node.name,
        "WARMSTART_NODE__CONTROL_TASK_QUEUE": settings.node.control_task_queue,
        "COLUMNS": "200",
    }
    proc = await asyncio.create_subprocess_exec(
        WARMSTART, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def address(temporal_env: WorkflowEnvironment) -> str:
    return temporal_env.client.service_client.config.target_host


@needs_criu
async def test_capture_list_describe_restore(workers: Settings, address: str) -> None:
    port = free_port()
    code, out, err = await cli(
        workers,
        address,
        "capture",
        "tokens",
        "--ready-http",
        f"http://127.0.0.1:{port}/",
        "--output",
        "json",
        "--",
        "python3",
        str(PROGRAMS / "token_server.py"),
        str(port),
    )
    assert code == 0, err
    captured = json.loads(out)
    assert "capture tokens: workflow capture/local/tokens/" in err

    code, out, _ = await cli(workers, address, "list", "--output", "json")
    assert code == 0
    [listed] = json.loads(out)
    assert (listed["checkpoint_id"], listed["name"], listed["version"]) == (
        captured["checkpoint_id"],
        "tokens",
        captured["version"],
    )

    code, out, err = await cli(workers, address, "restore", "tokens", "--output", "json")
    assert code == 0, err
    restored = json.loads(out)
    try:
        assert restored["checkpoint_id"] == captured["checkpoint_id"]
        code, out, _ = await cli(workers, address, "describe", "tokens", "--output", "json")
        described = json.loads(out)
        assert described["capture"]["phase"] == "Ready"
        assert described["restore"]["phase"] == "Restored"
        assert described["manifest"]["version"] == captured["version"]
    finally:
        await terminate(restored["pid"], grace_seconds=1)


async def test_restore_of_unknown_name_exits_1(settings: Settings, address: str) -> None:
    code, _, err = await cli(settings, address, "restore", "nosuch")
    assert code == 1
    assert "no committed checkpoint named or with ID 'nosuch'" in err


async def test_a_path_as_name_is_just_not_found(settings: Settings, address: str) -> None:
    code, _, err = await cli(settings, address, "describe", "../x")
    assert code == 1
    assert "[CheckpointNotFound] no committed checkpoint named or with ID '../x'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["capture", "x", "--ready-timeout", "inf", "--", "true"], "ready_timeout_seconds"),
        (["capture", "x", "--env", "NOVALUE", "--", "true"], "--env 'NOVALUE': expected"),
        (["capture", "x", "--env-secret", "T=vault:x", "--", "true"], "expected NAME=file:"),
        (["capture", "x"], "the following arguments are required: CMD"),
        (
            ["capture", "x", "--ready-tcp", "1", "--ready-http", "http://h/", "--", "true"],
            "at most one of --ready-tcp and --ready-http",
        ),
        (["capture", "x", "--backend", "tgi", "--", "true"], "backendFramework"),
        (["capture", "x", "--tp", "-1", "--", "true"], "tensorParallelSize"),
        (["capture", "bad/name", "--", "true"], "must match [A-Za-z0-9_.-]+"),
        (["capture", "x", "--ready-http", "ftp://h/", "--", "true"], "not an http(s) URL"),
        (["capture", "x", "--ready-timeout", "-5", "--", "true"], "ready_timeout_seconds"),
        (["capture", "x", "--ready-timeout", "1e300", "--", "true"], "less than or equal"),
        (["capture", "x", "--env", "=v", "--", "true"], "--env '=v': expected"),
        (["capture", "x", "--env-secret", "T=file:../x", "--", "true"], "secret_env.T.file"),
        (["restore", "x", "--timeout", "1e300"], "--timeout 1e+300: Input should be less"),
        (["restore", "x", "--timeout", "nan"], "--timeout nan: Input should be a finite"),
        (["restore", "x", "--timeout", "0"], "--timeout 0: Input should be greater than 0"),
        (
            ["restore", "x", "--env", "POD_NAME=a", "--env", "HF_TOKEN=t"],
            "--env HF_TOKEN: a restored process keeps the environment it was captured with; "
            "it re-reads only these names (Dynamo's restore context): CONTAINER_NAME,",
        ),
        (["prefetch", "x"], "prefetch needs remote storage: set WARMSTART_STORAGE__S3_BUCKET"),
    ],
)
async def test_usage_errors_exit_2(
    settings: Settings, address: str, args: list[str], message: str
) -> None:
    code, _, err = await cli(settings, address, *args)
    assert code == 2
    assert message in " ".join(err.split())


@needs_criu
async def test_failed_capture_exits_1_with_the_reason(workers: Settings, address: str) -> None:
    code, _, err = await cli(workers, address, "capture", "boom", "--", "sh", "-c", "exit 4")
    assert code == 1
    assert "[WorkloadExited]" in err and "status 4" in err
    code, out, _ = await cli(workers, address, "describe", "boom", "--output", "json")
    described = json.loads(out)
    assert described["manifest"] is None
    assert (described["capture"]["phase"], described["capture"]["reason"]) == (
        "Failed",
        "WorkloadExited",
    )
    code, out, _ = await cli(workers, address, "describe", "boom")
    assert code == 1 and "none committed" in out and "WorkloadExited" in out
    code, out, _ = await cli(workers, address, "pipelines", "--status", "failed", "-o", "json")
    assert code == 0
    [failed] = [p for p in json.loads(out) if p["name"] == "boom"]
    assert (failed["kind"], failed["status"], failed["reason"]) == (
        "capture",
        "FAILED",
        "WorkloadExited",
    )


async def test_no_server_exits_1_and_says_how_to_start_one(settings: Settings) -> None:
    code, _, err = await cli(settings, f"127.0.0.1:{free_port()}", "capture", "x", "--", "true")
    assert code == 1
    assert "warmstart dev" in err
