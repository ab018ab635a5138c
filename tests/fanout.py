"""One version prefetched to many simulated nodes (issue 24, point 3): real node workers in
this process, each with its own name, task queue, home and node cache, fetching from a real
S3-protocol server (moto's, in a process of its own, recording what it serves) through the
real `PrefetchWorkflow`. Shared by the suite's small run and `bench/prefetch_fanout.py`."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.objectstore.s3calls import client_config
from activities.storage.objectstore.transfer import TransferSettings
from api.naming import PREFETCH_WORKFLOW
from api.storage import RemoteStorage
from tests.checkpoint_trees import CKPT, VERSION, committed_version
from tests.s3server import REGION, Reads, recorded_reads, s3_client, start_recording
from workers.compose import control_worker, node_worker
from workers.settings import NodeSettings, Settings, StorageSettings
from workflows.contracts import PrefetchReport, PrefetchRequest

PREFIX = "fleet"
_ENDED = {
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
    EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED,
}


@dataclass(frozen=True)
class FanOut:
    report: PrefetchReport
    seconds: float  # the workflow's start to its result
    reads: Reads  # what the bucket served while it ran
    version_files: dict[str, int]  # key → size, of the version's objects
    most_at_once: int  # prefetch activities scheduled and not yet ended, at most (history)

    def file_reads_per_node(self, nodes: int) -> dict[str, float]:
        """Bytes the bucket served of each file of the version, per node (1.0: once each)."""
        return {
            key: self.reads.bytes.get(key, 0) / (size * nodes)
            for key, size in self.version_files.items()
            if size and not key.endswith("/manifest.json")
        }


def publish(endpoint: str, bucket: str, tmp: Path, files: dict[str, bytes]) -> dict[str, int]:
    """A version committed elsewhere and uploaded: its objects' keys and sizes."""
    transfer = TransferSettings(part_size=8 << 20, concurrency=4, compression="off")
    backend = S3Backend(
        client=s3_client(endpoint, config=client_config(transfer)),
        location=S3Location(bucket, PREFIX),
        settings=transfer,
    )
    local = committed_version(tmp / "elsewhere", files)
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    prefix = backend.location.version_prefix(CKPT, VERSION)
    listed = s3_client(endpoint).list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    return {str(item["Key"]): int(item["Size"]) for item in listed}


async def fan_out(
    client: Client,
    *,
    endpoint: str,
    bucket: str,
    tmp: Path,
    files: dict[str, bytes],
    nodes: int,
    at_once: int,
) -> FanOut:
    """Publish `files` as a version, then prefetch it to `nodes` fresh node workers,
    `at_once` at a time (0: all)."""
    version_files = publish(endpoint, bucket, tmp, files)
    suffix = uuid.uuid4().hex[:8]
    control_queue = f"warmstart-control-{suffix}"
    storage = StorageSettings(s3_bucket=bucket, s3_prefix=PREFIX, s3_endpoint=endpoint)
    base = Settings(
        home=tmp / "control",
        node=NodeSettings(name=f"control-{suffix}", control_task_queue=control_queue),
        storage=storage,
    )
    names = [f"fan-{suffix}-{i}" for i in range(nodes)]
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(control_worker(client, base))
        for name in names:
            node = replace(base, home=tmp / name, node=replace(base.node, name=name))
            await stack.enter_async_context(node_worker(client, node))
        request = PrefetchRequest(
            checkpoint_id=CKPT,
            version=VERSION,
            storage=RemoteStorage(
                kind="s3", bucket=bucket, prefix=PREFIX, endpoint=endpoint, region=REGION
            ),
            nodes=names,
            node_timeout_seconds=300,
            control_task_queue=control_queue,
            nodes_at_once=at_once,
        )
        start_recording(endpoint)
        started = time.monotonic()
        handle = await client.start_workflow(
            PREFETCH_WORKFLOW,
            request,
            id=f"prefetch/{CKPT}/{suffix}",
            task_queue=control_queue,
            result_type=PrefetchReport,
        )
        report: PrefetchReport = await handle.result()
        seconds = time.monotonic() - started
        reads = recorded_reads(endpoint, bucket)
    in_flight = most = 0
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            in_flight += 1
            most = max(most, in_flight)
        elif event.event_type in _ENDED:
            in_flight -= 1
    return FanOut(report, seconds, reads, version_files, most)
