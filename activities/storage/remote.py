"""The node's side of remote storage: a backend for the S3 location a request names, and
transfers run in a thread while the activity heartbeats their progress.

Clients are built once per endpoint, region and credentials and kept (a boto3 client
takes tens of milliseconds to build, and its connection pool is what keeps parallel parts
fast). Credentials never come with a request: boto3's standard chain, or a Secret the
request names, read through `SecretReader` (the kube API on a cluster node).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from temporalio import activity

from activities.contracts import Heartbeat, RemoteStorage
from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.objectstore.s3calls import client_config
from activities.storage.objectstore.transfer import (
    ProgressCallback,
    TransferProgress,
    TransferSettings,
)
from api.errors import InvalidSpecError, StorageError, WarmstartError
from api.reasons import Reason

T = TypeVar("T")
# (namespace, name) -> the Secret's data, decoded.
SecretReader = Callable[[str, str], Mapping[str, str]]
HEARTBEAT_EVERY_SECONDS = 1.0


class RemoteStores:
    """Backends for the S3 locations requests name, sharing clients."""

    def __init__(
        self,
        *,
        transfer: TransferSettings,
        endpoint: str = "",
        region: str = "",
        read_secret: SecretReader | None = None,
    ) -> None:
        """`endpoint` and `region`: this worker's, for locations that name none."""
        self._transfer = transfer
        self._endpoint = endpoint
        self._region = region
        self._read_secret = read_secret
        self._clients: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def backend(self, storage: RemoteStorage) -> S3Backend:
        settings = self._transfer
        if storage.sse:
            settings = TransferSettings(
                part_size=settings.part_size,
                concurrency=settings.concurrency,
                sse=storage.sse,
                kms_key_id=storage.kms_key_id,
                durable=settings.durable,
                copy_buffer=settings.copy_buffer,
            )
        return S3Backend(
            client=self._client(storage),
            location=S3Location(storage.bucket, storage.prefix),
            settings=settings,
        )

    def _client(self, storage: RemoteStorage) -> Any:
        keys = self._credentials(storage)
        endpoint = storage.endpoint or self._endpoint
        region = storage.region or self._region
        cache_key = (endpoint, region, *sorted(f"{k}={v}" for k, v in keys.items()))
        with self._lock:
            client = self._clients.get(cache_key)
            if client is None:
                import boto3  # its import is slow; only nodes that move bytes pay it

                client = boto3.session.Session().client(
                    "s3",
                    endpoint_url=endpoint or None,
                    region_name=region or None,
                    config=client_config(self._transfer),
                    aws_access_key_id=keys.get("aws_access_key_id"),
                    aws_secret_access_key=keys.get("aws_secret_access_key"),
                    aws_session_token=keys.get("aws_session_token"),
                )
                self._clients[cache_key] = client
        return client

    def _credentials(self, storage: RemoteStorage) -> dict[str, str]:
        if not storage.credentials_secret:
            return {}  # boto3's standard chain
        where = f"Secret {storage.secret_namespace}/{storage.credentials_secret}"
        if self._read_secret is None:
            raise InvalidSpecError(
                f"{storage.uri}: credentials {where} are named, but this worker has no API "
                "access to read Secrets (use boto3's standard chain on it)"
            )
        data = self._read_secret(storage.secret_namespace, storage.credentials_secret)
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not data.get(k)]
        if missing:
            raise StorageError(f"{storage.uri}: credentials {where} lack {', '.join(missing)}")
        keys = {
            "aws_access_key_id": data["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": data["AWS_SECRET_ACCESS_KEY"],
        }
        if data.get("AWS_SESSION_TOKEN"):
            keys["aws_session_token"] = data["AWS_SESSION_TOKEN"]
        return keys


class TransferStopped(WarmstartError):
    """The activity was cancelled: the transfer's threads stop at their next block."""

    default_reason = Reason.CANCELLED


class TransferBeat:
    """A transfer's progress callback (called from its threads): keeps the latest report
    for the activity's heartbeat, and stops the transfer once the activity is cancelled."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.latest: TransferProgress | None = None
        self._stopped = threading.Event()

    def __call__(self, progress: TransferProgress) -> None:
        if self._stopped.is_set():
            raise TransferStopped(f"{self.stage} stopped: the activity was cancelled")
        self.latest = progress

    def stop(self) -> None:
        self._stopped.set()

    def heartbeat(self) -> Heartbeat:
        latest = self.latest
        if latest is None:
            return Heartbeat(stage=self.stage)
        return Heartbeat(
            stage=self.stage,
            bytes=latest.bytes_done,
            bytes_total=latest.bytes_total,
            rate=round(latest.rate, 1),
        )


async def heartbeating(stage: str, work: Callable[[ProgressCallback], Awaitable[T]]) -> T:
    """Await `work(progress)` while heartbeating its progress every second; a cancel stops
    the transfer and waits for its threads, so nothing is written after the activity ends."""
    beat = TransferBeat(stage)
    task = asyncio.ensure_future(work(beat))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_EVERY_SECONDS)
            if done:
                return task.result()
            activity.heartbeat(beat.heartbeat())
    except asyncio.CancelledError:
        beat.stop()
        await asyncio.wait({task})
        raise


async def in_thread(stage: str, call: Callable[[ProgressCallback], T]) -> T:
    """`call(progress)`, a blocking transfer, in a thread, heartbeated as `heartbeating`."""

    async def run(progress: ProgressCallback) -> T:
        return await asyncio.to_thread(call, progress)

    return await heartbeating(stage, run)
