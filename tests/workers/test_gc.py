"""Retention from the outside: the `warmstart-retention` Schedule (created, then updated in
place) and `warmstart gc` as a user runs it, against the dev server (and, with remote
storage configured, moto's S3 server)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.client import Client, ScheduleActionStartWorkflow, ScheduleOverlapPolicy

from activities.storage.catalog import LocalCatalog
from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.retention import RemoteVersions
from activities.storage.store import CheckpointStore
from api.errors import InvalidSpecError
from api.retention import RETENTION_SCHEDULE_ID, RETENTION_WORKFLOW, RetentionPolicy
from tests.committing import commit_version
from tests.kube import start_cluster
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, new_bucket, s3_client
from workers.compose import cluster_control_worker, control_worker
from workers.retention import ensure_retention_schedule, retention_policies, retention_request
from workers.settings import RetentionSettings, Settings, StorageSettings

pytestmark = pytest.mark.timeout(120)
WARMSTART = str(Path(sys.executable).parent / "warmstart")
T0 = datetime(2026, 11, 24, tzinfo=UTC)


async def test_schedule_is_created_then_updated(client: Client, settings: Settings) -> None:
    handle = await ensure_retention_schedule(client, settings=settings)
    try:
        faster = dataclasses.replace(settings, retention=RetentionSettings(interval_seconds=600))
        again = await ensure_retention_schedule(client, settings=faster)
        assert again.id == handle.id == RETENTION_SCHEDULE_ID
        schedule = (await handle.describe()).schedule
        [interval] = schedule.spec.intervals
        assert interval.every == timedelta(minutes=10)
        assert schedule.policy.overlap == ScheduleOverlapPolicy.SKIP
        action = schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert action.workflow == RETENTION_WORKFLOW
        assert action.task_queue == settings.node.control_task_queue
    finally:
        await handle.delete()


async def _gc(
    settings: Settings, address: str, *args: str, extra_env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(settings.home),
        "WARMSTART_HOME": str(settings.home),
        "WARMSTART_TEMPORAL__ADDRESS": address,
        "WARMSTART_NODE__CONTROL_TASK_QUEUE": settings.node.control_task_queue,
        "WARMSTART_RETENTION__KEEP_NEWEST_PER_IDENTITY": "1",
        **(extra_env or {}),
    }
    proc = await asyncio.create_subprocess_exec(
        WARMSTART,
        "gc",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_gc_dry_run_then_for_real(client: Client, settings: Settings) -> None:
    store = CheckpointStore(settings.checkpoint_root)
    old = commit_version(store, model="m", created_at=T0)
    new = commit_version(store, model="m", created_at=T0 + timedelta(hours=1), suffix="bbbbbb")
    address = client.service_client.config.target_host
    async with control_worker(client, settings):
        code, out, err = await _gc(settings, address, "--dry-run", "--output", "json")
        assert code == 0, err
        summary = json.loads(out)
        assert [d["version"] for d in summary["deleted"]] == [old.version]
        assert len(LocalCatalog(store.root).checkpoints()) == 2

        code, out, err = await _gc(settings, address)
    assert code == 0, err
    assert f"version {old.version}" in out and "deleted, beyond the 1 newest" in out
    assert [e.version for e in LocalCatalog(store.root).checkpoints()] == [new.version]


async def test_gc_on_a_cluster_keeps_the_version_a_waiting_restore_target_needs(
    client: Client, settings: Settings
) -> None:
    store = CheckpointStore(settings.checkpoint_root)
    old = commit_version(store, model="m", created_at=T0)
    new = commit_version(store, model="m", created_at=T0 + timedelta(hours=1), suffix="bbbbbb")
    # Admitted by the webhook for the older version, before any node restores it (not yet
    # scheduled): no RestoreWorkflow runs for it, only the pod says it is needed.
    pod = {
        "metadata": {
            "name": "llama-0",
            "namespace": "inference",
            "labels": {
                "warmstart.dev/restore-target": "true",
                "warmstart.dev/checkpoint-id": old.checkpoint_id,
            },
            "annotations": {"warmstart.dev/checkpoint-version": old.version},
        },
        "spec": {"containers": [{"name": "main", "image": "local/workload"}]},
    }
    address = client.service_client.config.target_host
    async for cluster in start_cluster():
        await cluster.run(cluster.core.create_namespaced_pod, "inference", pod)
        async with cluster_control_worker(client, settings, cluster.api):
            code, out, err = await _gc(settings, address)
            assert code == 0, err
            assert "deleted 0 version(s)" in out
            assert len(LocalCatalog(store.root).checkpoints()) == 2

            # Restored (the node published it): the pod waits no more.
            restored = {"metadata": {"annotations": {"warmstart.dev/restore-status": "restored"}}}
            await cluster.run(cluster.core.patch_namespaced_pod, "llama-0", "inference", restored)
            code, out, err = await _gc(settings, address)
    assert code == 0, err
    assert f"version {old.version}" in out and "deleted, beyond the 1 newest" in out
    assert [e.version for e in LocalCatalog(store.root).checkpoints()] == [new.version]


async def test_gc_applies_the_policy_in_the_configured_bucket(
    client: Client, settings: Settings, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3 = s3_client(s3_endpoint)
    bucket = new_bucket(s3)
    storage = StorageSettings(
        s3_bucket=bucket, s3_prefix="fleet", s3_endpoint=s3_endpoint, s3_region=REGION
    )
    settings = dataclasses.replace(settings, storage=storage)
    assert retention_request(settings).remote and not retention_request(Settings()).remote
    node = CheckpointStore(settings.home / "node")
    remote = RemoteVersions(S3Backend(client=s3, location=S3Location(bucket, "fleet")))
    made = [
        commit_version(node, model="m", created_at=T0 + timedelta(hours=h), suffix=f"{h}" * 6)
        for h in (0, 1)
    ]
    for manifest in made:
        version_dir = node.version_dir(manifest.checkpoint_id, manifest.version)
        remote.backend.upload_version(
            version_dir, checkpoint_id=manifest.checkpoint_id, version=manifest.version
        )
    # The control worker's client finds its keys by boto3's standard chain.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    address = client.service_client.config.target_host
    env = {"WARMSTART_STORAGE__S3_BUCKET": bucket}
    async with control_worker(client, settings):
        code, out, err = await _gc(
            settings, address, "--dry-run", "--output", "json", extra_env=env
        )
        assert code == 0, err
        summary = json.loads(out)["remote"]
        assert summary["location"] == f"s3://{bucket}/fleet/"
        assert [d["version"] for d in summary["deleted"]] == [made[0].version]
        assert len(remote.versions()) == 2

        code, out, err = await _gc(settings, address, extra_env=env)
    assert code == 0, err
    assert (
        f"s3://{bucket}/fleet/: checkpoint {made[0].checkpoint_id} version {made[0].version}" in out
    )
    assert "deleted, beyond the 1 newest" in out
    assert [v.version for v in remote.versions()] == [made[1].version]


async def test_gc_flags_exclude_each_other(settings: Settings) -> None:
    code, _out, err = await _gc(settings, "127.0.0.1:1", "--schedule", "--dry-run")
    assert code == 2 and "at most one of --schedule and --dry-run" in err


def test_policies_come_from_settings_and_a_per_namespace_file(tmp_path: Path) -> None:
    policies_file = tmp_path / "policies.json"
    policies_file.write_text(json.dumps({"dev": {"keep_newest_per_identity": 1}}))
    settings = Settings.from_env(
        {
            "WARMSTART_RETENTION__MAX_AGE_DAYS": "30",
            "WARMSTART_RETENTION__MAX_TOTAL_BYTES": str(100 << 30),
            "WARMSTART_RETENTION__POLICIES_FILE": str(policies_file),
        }
    )
    policies = retention_policies(settings)
    assert policies.default == RetentionPolicy(max_age_days=30, max_total_bytes=100 << 30)
    assert policies.for_namespace("dev") == RetentionPolicy(keep_newest_per_identity=1)
    assert policies.for_namespace("prod") == policies.default


def test_a_bad_policies_file_is_named(tmp_path: Path) -> None:
    policies_file = tmp_path / "policies.json"
    policies_file.write_text(json.dumps({"dev": {"keep_newest_per_identity": 0}}))
    settings = Settings(retention=RetentionSettings(policies_file=str(policies_file)))
    with pytest.raises(InvalidSpecError, match=r"retention policies file .*policies\.json"):
        retention_policies(settings)
