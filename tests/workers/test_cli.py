"""The `warmstart` CLI as a user runs it: a separate process talking to the dev server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.host.processes import terminate
from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.quarantine import NodeClass, Quarantine, QuarantineEvidence
from activities.storage.store import CheckpointStore
from tests.committing import commit_version
from tests.conftest import needs_criu
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, new_bucket, s3_client
from workers.compose import control_worker
from workers.ports import free_port
from workers.settings import QuarantineSettings, Settings

WARMSTART = str(Path(sys.executable).parent / "warmstart")
PROGRAMS = Path(__file__).resolve().parents[1] / "programs"


async def cli(
    settings: Settings, address: str, *args: str, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    given = env or {}
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(settings.home),
        "WARMSTART_HOME": str(settings.home),
        "WARMSTART_TEMPORAL__ADDRESS": address,
        "WARMSTART_NODE__NAME": settings.node.name,
        "WARMSTART_NODE__CONTROL_TASK_QUEUE": settings.node.control_task_queue,
        "COLUMNS": "200",
        **given,
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


@pytest_asyncio.fixture
async def control(client: Client, settings: Settings) -> AsyncIterator[Settings]:
    """The control worker alone: what the catalog and quarantine commands ask (judging
    quarantines as on a cluster: two nodes' failures)."""
    settings = replace(settings, quarantine=QuarantineSettings(min_nodes=2))
    async with control_worker(client, settings):
        yield settings


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


async def test_a_path_as_name_is_just_not_found(control: Settings, address: str) -> None:
    settings = control
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


@needs_criu
async def test_capture_verify_fails_1_with_the_test_restores_reason(
    workers: Settings, address: str
) -> None:
    port = free_port()
    program = ("python3", str(PROGRAMS / "process_bound_server.py"), str(port))
    ready = ("--ready-http", f"http://127.0.0.1:{port}/")
    flags = ("--verify", "--verify-timeout", "2")
    code, _, err = await cli(workers, address, "capture", "bound", *ready, *flags, "--", *program)
    assert code == 1
    assert "[VerifyFailed]" in err and "test restore did not answer" in err
    assert "within 2 s" in err
    code, out, _ = await cli(workers, address, "list", "--output", "json")
    assert code == 0 and [c for c in json.loads(out) if c["name"] == "bound"] == []


async def test_capture_verify_with_leave_running_is_a_usage_error(settings: Settings) -> None:
    args = ("capture", "both", "--verify", "--leave-running", "--", "true")
    code, _, err = await cli(settings, f"127.0.0.1:{free_port()}", *args)
    assert code == 2
    assert "leaves its workload running cannot be verified" in err


async def test_no_server_exits_1_and_says_how_to_start_one(settings: Settings) -> None:
    code, _, err = await cli(settings, f"127.0.0.1:{free_port()}", "capture", "x", "--", "true")
    assert code == 1
    assert "warmstart dev" in err


T0 = datetime(2026, 11, 24, tzinfo=UTC)


def _failed(
    quarantine: Quarantine, checkpoint_id: str, version: str, gpu: str, nodes: tuple[str, ...]
) -> None:
    """`nodes` of class `gpu` record that restores of the version failed there."""
    now = datetime.now(UTC)
    for node in nodes:
        quarantine.record(
            QuarantineEvidence(
                checkpoint_id=checkpoint_id,
                version=version,
                node_class=NodeClass(gpu_model=gpu, gpu_driver="560", criu="4.2.1"),
                node=node,
                reason="RestoreFailed",
                message="criu restore failed",
                since=now,
                last=now,
            )
        )


async def test_list_describe_and_quarantine_ask_the_control_side_not_this_disk(
    control: Settings, address: str, tmp_path: Path
) -> None:
    store = CheckpointStore(control.checkpoint_root)  # the store the control worker mounts
    made = commit_version(store, model="llama", created_at=T0)
    quarantine = Quarantine(store.root)
    for gpu in ("H100", "A100"):
        _failed(quarantine, made.checkpoint_id, made.version, gpu, ("gpu-1", "gpu-2"))
    _failed(quarantine, made.checkpoint_id, made.version, "L40S", ("gpu-3",))  # pending
    # Another machine: its own state holds something else, which the CLI must not show.
    laptop = replace(control, home=tmp_path / "laptop")
    decoy = commit_version(CheckpointStore(laptop.checkpoint_root), model="decoy", created_at=T0)
    laptop_quarantine = Quarantine(laptop.checkpoint_root)
    _failed(laptop_quarantine, decoy.checkpoint_id, decoy.version, "L4", ("gpu-1", "gpu-2"))

    code, out, err = await cli(laptop, address, "list", "-o", "json")
    assert code == 0, err
    [listed] = json.loads(out)
    assert (listed["name"], listed["version"], listed["location"]) == (
        "llama",
        made.version,
        str(store.version_dir(made.checkpoint_id, made.version)),
    )
    code, out, err = await cli(laptop, address, "describe", "llama", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["manifest"]["version"] == made.version
    code, _, err = await cli(laptop, address, "describe", "decoy")
    assert code == 1 and "no committed checkpoint named or with ID 'decoy'" in err

    code, out, err = await cli(laptop, address, "quarantine", "list", "llama", "-o", "json")
    assert code == 0, err
    listed = {e["node_class"]["gpu_model"]: e for e in json.loads(out)}
    assert sorted(listed) == ["A100", "H100", "L40S"]
    assert [listed[gpu]["active"] for gpu in ("A100", "H100", "L40S")] == [True, True, False]
    assert listed["H100"]["version"] == made.version
    assert listed["H100"]["nodes"] == ["gpu-1", "gpu-2"]
    code, out, _ = await cli(laptop, address, "quarantine")
    assert "A100" in out and "L4," not in out
    assert f"version {made.version}: pending on node class [L40S, driver 560" in out
    code, out, err = await cli(laptop, address, "quarantine", "clear", "llama")
    assert code == 0, err
    assert f"checkpoint {made.checkpoint_id}: 3 quarantine entr(ies) cleared" in out
    assert quarantine.entries(pending=True) == []
    assert len(laptop_quarantine.entries()) == 1  # untouched
    code, out, _ = await cli(laptop, address, "quarantine", "list")
    assert "no checkpoint is quarantined" in out
    code, _, err = await cli(laptop, address, "quarantine", "clear", "nosuch")
    assert code == 1 and "[CheckpointNotFound] no committed checkpoint named" in err
    code, _, err = await cli(laptop, address, "quarantine", "clear")
    assert code == 2 and "quarantine clear needs REF" in err


async def test_list_and_describe_read_the_bucket_and_listing_gets_no_manifest(
    settings: Settings,
    address: str,
    s3_endpoint: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = s3_client(s3_endpoint)
    bucket = new_bucket(client)
    backend = S3Backend(client=client, location=S3Location(bucket, "fleet"))
    node = CheckpointStore(tmp_path / "elsewhere")  # the node that captured them
    made = [
        commit_version(node, model=model, created_at=T0 + timedelta(hours=hours))
        for hours, model in enumerate(("llama", "qwen", "llama"))
    ]
    for manifest in made:
        backend.upload_version(
            node.version_dir(manifest.checkpoint_id, manifest.version),
            checkpoint_id=manifest.checkpoint_id,
            version=manifest.version,
        )
    storage = {
        "WARMSTART_STORAGE__S3_BUCKET": bucket,
        "WARMSTART_STORAGE__S3_PREFIX": "fleet",
        "WARMSTART_STORAGE__S3_ENDPOINT": s3_endpoint,
        "WARMSTART_STORAGE__S3_REGION": REGION,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }
    caplog.set_level(logging.INFO, logger="werkzeug")  # the S3 server's request log

    def requests() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if f"/{bucket}" in r.getMessage()]
        caplog.clear()
        return lines

    requests()
    code, out, err = await cli(settings, address, "list", "-o", "json", env=storage)
    assert code == 0, err
    listed = json.loads(out)
    assert [(e["name"], e["version"]) for e in listed] == [
        (m.source.name, m.version) for m in reversed(made)
    ]
    assert listed[0]["location"] == (
        f"s3://{bucket}/fleet/{made[2].checkpoint_id}/versions/{made[2].version}/"
    )
    sent = requests()
    assert len(sent) == 1 and "list-type=2" in sent[0] and "/index/" in sent[0]
    assert not settings.checkpoint_root.exists()

    code, out, err = await cli(settings, address, "describe", "qwen", "-o", "json", env=storage)
    assert code == 0, err
    assert json.loads(out)["manifest"]["version"] == made[1].version
    manifests = [line for line in requests() if "manifest.json" in line]
    assert len(manifests) == 1 and made[1].version in manifests[0]
