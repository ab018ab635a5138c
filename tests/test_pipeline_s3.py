"""The local pipeline with S3 storage end to end: real dev server, workers, CRIU, and a real
S3-protocol server. A capture is Ready only once uploaded; a node without the version
fetches it into its cache on restore; prefetch warms the cache; upload failures are named."""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.client import Client

from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.store import CheckpointStore
from api.errors import DigestMismatchError, PipelineFailedError
from api.reasons import Reason
from api.workload import Readiness
from tests.checkpoint_trees import CKPT, VERSION, committed_version, fetched, tree_files
from tests.conftest import needs_criu
from tests.pipeline import (
    capture,
    capture_request,
    get_json,
    restore,
    sample_workload,
    shell_workload,
)
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, new_bucket, s3_client
from workers.compose import control_worker, node_worker
from workers.operations import prefetch, remote_storage
from workers.ports import free_port
from workers.remote import store_catalog
from workers.settings import Settings, StorageSettings
from workflows.contracts import CaptureRequest, PrefetchRequest

PREFIX = "fleet/a"


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    return s3_client(s3_endpoint)


@pytest.fixture
def s3_settings(
    settings: Settings, s3: Any, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    # The node's credentials come from boto3's standard chain, as on a real node.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    storage = StorageSettings(
        s3_bucket=new_bucket(s3),
        s3_prefix=PREFIX,
        s3_endpoint=s3_endpoint,
        s3_region=REGION,
        sse="AES256",
        part_size_mib=5,
        concurrency=4,
    )
    return replace(settings, storage=storage)


@pytest_asyncio.fixture
async def s3_workers(client: Client, s3_settings: Settings) -> AsyncIterator[Settings]:
    env = {"PATH": "/usr/bin:/bin"}
    async with control_worker(client, s3_settings), node_worker(client, s3_settings, base_env=env):
        yield s3_settings


def _keys(s3: Any, bucket: str) -> set[str]:
    listed = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"] for o in listed}


@needs_criu
async def test_capture_uploads_and_a_node_without_it_fetches_it(
    client: Client, s3_workers: Settings, s3: Any
) -> None:
    port = free_port()
    request = capture_request(s3_workers, sample_workload("s3trip", port))
    result = await capture(client, request)
    bucket, ckpt = s3_workers.storage.s3_bucket, result.checkpoint_id
    prefix = f"{PREFIX}/{ckpt}/versions/{result.version}/"
    assert result.storage_uri == f"s3://{bucket}/{prefix}"
    assert "upload" in result.step_seconds
    keys = _keys(s3, bucket)
    assert f"{prefix}manifest.json" in keys and any("criu/pages-" in k for k in keys)
    head = s3.head_object(Bucket=bucket, Key=f"{prefix}manifest.json")
    assert head["ServerSideEncryption"] == "AES256"

    # This node now acts as one that never had it: only S3 holds the version.
    store = CheckpointStore(s3_workers.checkpoint_root)
    log = (store.find(ckpt) / "workload-output.log").read_text()
    instance = re.search(r"instance ([0-9a-f]{32})", log)
    assert instance, log
    shutil.rmtree(store.checkpoint_dir(ckpt))

    storage = remote_storage(s3_workers)
    restored = await restore(client, s3_workers, "s3trip", ckpt, storage=storage)
    try:
        assert get_json(f"http://127.0.0.1:{port}/info")["instance_id"] == instance.group(1)
        assert set(restored.stage_seconds) == {
            "verify",
            "fetch",
            "prepare",
            "criu-restore",
            "await-answer",
        }
    finally:
        from activities.host.processes import terminate

        assert await terminate(restored.pid, grace_seconds=5)
    cached = fetched(s3_workers.home / "cache" / "checkpoints")
    assert cached.find(ckpt).name == result.version

    again = await restore(client, s3_workers, "s3trip", ckpt, storage=storage)
    from activities.host.processes import terminate

    assert await terminate(again.pid, grace_seconds=5)
    assert "fetch" not in again.stage_seconds  # the cache had it


@needs_criu
async def test_an_upload_that_cannot_reach_its_bucket_fails_the_capture_naming_it(
    client: Client, s3_settings: Settings
) -> None:
    settings = replace(s3_settings, storage=replace(s3_settings.storage, s3_bucket="no-such-ckpts"))
    env = {"PATH": "/usr/bin:/bin"}
    async with control_worker(client, settings), node_worker(client, settings, base_env=env):
        request = capture_request(settings, sample_workload("s3nobucket", free_port()))
        with pytest.raises(PipelineFailedError) as failed:
            await capture(client, request)
    assert failed.value.reason == Reason.STORAGE_FAILED
    assert "s3://no-such-ckpts: bucket does not exist" in failed.value.message
    # Committed on the node, but not Ready: nothing was published under the bucket's name.
    assert CheckpointStore(settings.checkpoint_root).find(request.checkpoint_id)


@needs_criu
async def test_a_verified_capture_uploads_only_a_version_whose_test_restore_answered(
    client: Client, s3_workers: Settings, s3: Any
) -> None:
    """Verified before upload (decision 0045): the bucket gets the version that answered,
    never the one that did not."""
    programs = Path(__file__).parent / "programs"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"

    def request(program: str) -> CaptureRequest:
        workload = shell_workload(
            "s3verified",
            f"exec python3 {programs}/{program} {port}",
            readiness=Readiness(kind="http", http_url=url),
        )
        made = capture_request(s3_workers, workload)
        return made.model_copy(update={"verify": True, "verify_answer_seconds": 2.0})

    good = await capture(client, request("token_server.py"))
    steps = list(good.step_seconds)
    assert steps.index("verify") < steps.index("upload") < steps.index("publish")
    bucket = s3_workers.storage.s3_bucket
    versions = f"{PREFIX}/{good.checkpoint_id}/versions/"
    uploaded = {k for k in _keys(s3, bucket) if k.startswith(versions)}
    assert f"{versions}{good.version}/manifest.json" in uploaded

    with pytest.raises(PipelineFailedError) as failed:
        await capture(client, request("process_bound_server.py"))
    assert failed.value.reason == Reason.VERIFY_FAILED
    assert {k for k in _keys(s3, bucket) if k.startswith(versions)} == uploaded
    assert [e.version for e in store_catalog(s3_workers).checkpoints()] == [good.version]


def publish(
    settings: Settings, s3: Any, tmp_path: Path, version: str = VERSION
) -> dict[str, bytes]:
    """A version committed on another node and uploaded to the settings' bucket."""
    from activities.storage.objectstore.s3calls import client_config
    from activities.storage.objectstore.transfer import TransferSettings

    transfer = TransferSettings(part_size=5 << 20, concurrency=4)
    backend = S3Backend(
        client=s3_client(s3.meta.endpoint_url, config=client_config(transfer)),
        location=S3Location(settings.storage.s3_bucket, PREFIX),
        settings=transfer,
    )
    files = tree_files()
    local = committed_version(tmp_path / f"elsewhere-{version}", files, version=version)
    backend.upload_version(local, checkpoint_id=CKPT, version=version)
    return files


async def test_prefetch_warms_the_node_cache_once(
    client: Client, s3_workers: Settings, s3: Any, tmp_path: Path
) -> None:
    bucket = s3_workers.storage.s3_bucket
    files = publish(s3_workers, s3, tmp_path)
    storage = remote_storage(s3_workers)
    assert storage is not None
    request = PrefetchRequest(
        checkpoint_id=CKPT,
        storage=storage,
        nodes=[s3_workers.node.name],
        control_task_queue=s3_workers.node.control_task_queue,
    )
    first = await prefetch(client, request)
    [node] = first.nodes
    assert node.error == "" and node.result is not None
    assert node.result.downloaded and node.result.version == VERSION
    assert node.result.size_bytes == sum(map(len, files.values()))
    cached = fetched(s3_workers.home / "cache" / "checkpoints").find(CKPT, VERSION)
    assert {p: (cached / p).read_bytes() for p in files} == files

    [again] = (await prefetch(client, request)).nodes
    assert again.result is not None and not again.result.downloaded

    missing = request.model_copy(update={"checkpoint_id": "0" * 16})
    [lost] = (await prefetch(client, missing)).nodes
    assert lost.result is None
    assert (
        lost.error.startswith(f"{Reason.CHECKPOINT_NOT_FOUND}: ")
        and f"s3://{bucket}/{PREFIX}/" in lost.error
    )


def test_the_catalog_lists_what_only_the_remote_store_holds(
    s3_settings: Settings, s3: Any, tmp_path: Path
) -> None:
    newer = "20261125T000000Z-bbbbbb"
    publish(s3_settings, s3, tmp_path)
    publish(s3_settings, s3, tmp_path, version=newer)
    # This node holds the newer version too: it is listed once, as the node's.
    committed_version(s3_settings.checkpoint_root, tree_files(), version=newer)
    catalog = store_catalog(s3_settings)
    listed = [(e.version, e.location) for e in catalog.checkpoints()]
    bucket = s3_settings.storage.s3_bucket
    assert listed == [
        (newer, str(CheckpointStore(s3_settings.checkpoint_root).version_dir(CKPT, newer))),
        (VERSION, f"s3://{bucket}/{PREFIX}/{CKPT}/versions/{VERSION}/"),
    ]
    assert catalog.find(CKPT).version == newer  # the node's, newest
    remote_entry = catalog.checkpoints()[1]
    assert catalog.manifest(remote_entry).version == VERSION
    # A manifest damaged after its commit: the index still lists the version (listing reads
    # no manifest), describing it says what is wrong.
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{CKPT}/versions/{VERSION}/manifest.json", Body=b"{")
    catalog = store_catalog(s3_settings)
    assert [e.version for e in catalog.checkpoints()] == [newer, VERSION]
    with pytest.raises(DigestMismatchError, match=r"manifest\.json is not a valid manifest"):
        catalog.manifest(catalog.checkpoints()[1])
