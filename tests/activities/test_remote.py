"""The node's remote stores: a backend of the location's kind (from the registry); S3
clients one per endpoint, region and credentials; the worker's own endpoint for locations
that name none; credentials from a named Secret, checked."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from temporalio.testing import ActivityEnvironment

from activities.contracts import Heartbeat
from activities.storage.backends import KindContext, register, unregister
from activities.storage.objectstore.filesystem import FilesystemBackend
from activities.storage.objectstore.s3 import S3Backend
from activities.storage.objectstore.transfer import (
    ProgressCallback,
    TransferProgress,
    TransferSettings,
)
from activities.storage.remote import RemoteStores, in_thread
from api.errors import InvalidSpecError, StorageError
from api.storage import RemoteStorage

PLAIN = RemoteStorage(bucket="ckpts", prefix="fleet")
WITH_SECRET = RemoteStorage(bucket="ckpts", credentials_secret="keys", secret_namespace="ml")


def secrets(data: Mapping[str, str]) -> dict[tuple[str, str], Mapping[str, str]]:
    return {("ml", "keys"): data}


def test_locations_without_an_endpoint_use_the_workers_and_share_its_client() -> None:
    stores = RemoteStores(
        transfer=TransferSettings(), own_endpoints={"s3": ("http://s3.local:9000", "eu-west-1")}
    )
    one, two = stores.backend(PLAIN), stores.backend(PLAIN.model_copy(update={"prefix": "x"}))
    assert isinstance(one, S3Backend) and isinstance(two, S3Backend)
    client = one.client
    assert client is two.client
    assert (client.meta.endpoint_url, client.meta.region_name) == (
        "http://s3.local:9000",
        "eu-west-1",
    )
    own = stores.backend(PLAIN.model_copy(update={"endpoint": "http://other:9000"}))
    assert isinstance(own, S3Backend)
    assert own.client.meta.endpoint_url == "http://other:9000"


def test_a_named_secret_gives_the_clients_keys() -> None:
    found = secrets({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t"})
    stores = RemoteStores(transfer=TransferSettings(), read_secret=lambda ns, n: found[(ns, n)])
    backend = stores.backend(WITH_SECRET)
    assert isinstance(backend, S3Backend)
    keys = backend.client._request_signer._credentials  # type: ignore[attr-defined]
    assert (keys.access_key, keys.secret_key) == ("AKIAEXAMPLE", "s3cr3t")


def test_a_secret_without_both_keys_is_refused_naming_it() -> None:
    found = secrets({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE"})
    stores = RemoteStores(transfer=TransferSettings(), read_secret=lambda ns, n: found[(ns, n)])
    with pytest.raises(StorageError, match="Secret ml/keys lack AWS_SECRET_ACCESS_KEY"):
        stores.backend(WITH_SECRET)


def test_a_secret_named_where_none_can_be_read_is_an_invalid_spec() -> None:
    with pytest.raises(InvalidSpecError, match="credentials Secret ml/keys are named"):
        RemoteStores(transfer=TransferSettings()).backend(WITH_SECRET)


def test_encryption_of_the_location_applies_to_its_transfers() -> None:
    stores = RemoteStores(transfer=TransferSettings(part_size=8 << 20))
    kms = stores.backend(PLAIN.model_copy(update={"sse": "aws:kms", "kms_key_id": "alias/k"}))
    assert isinstance(kms, S3Backend)
    assert (kms.settings.sse, kms.settings.kms_key_id, kms.settings.part_size) == (
        "aws:kms",
        "alias/k",
        8 << 20,
    )


def test_a_location_of_an_unknown_kind_is_refused_naming_the_known_ones() -> None:
    stores = RemoteStores(transfer=TransferSettings())
    with pytest.raises(InvalidSpecError, match=r"storage kind 'gs' is not known \(known: .*s3"):
        stores.backend(PLAIN.model_copy(update={"kind": "gs"}))


def test_an_s3_location_needs_an_s3_bucket_name() -> None:
    odd = RemoteStorage(bucket="under_score")  # a name other kinds accept
    with pytest.raises(InvalidSpecError, match="'under_score' is not an S3 bucket name"):
        RemoteStores(transfer=TransferSettings()).backend(odd)


def test_a_registered_kind_is_opened_once_with_the_workers_context_and_endpoint(
    tmp_path: Path,
) -> None:
    opened: list[RemoteStorage] = []
    contexts: list[KindContext] = []

    class Shelf:
        def __init__(self, context: KindContext) -> None:
            contexts.append(context)

        def open(self, storage: RemoteStorage) -> FilesystemBackend:
            opened.append(storage)
            return FilesystemBackend(root=Path(storage.endpoint) / storage.bucket)

    register("shelf", Shelf)
    try:
        transfer = TransferSettings(part_size=8 << 20)
        stores = RemoteStores(transfer=transfer, own_endpoints={"shelf": (str(tmp_path), "")})
        backend = stores.backend(RemoteStorage(kind="shelf", bucket="ckpts"))
        stores.backend(RemoteStorage(kind="shelf", bucket="other"))
    finally:
        unregister("shelf")
    assert isinstance(backend, FilesystemBackend)
    assert backend.uri() == f"{tmp_path}/ckpts/"
    assert [c.transfer for c in contexts] == [transfer]  # one kind object per worker
    assert [s.endpoint for s in opened] == [str(tmp_path)] * 2


async def test_a_transfer_heartbeats_its_progress_and_stops_when_cancelled() -> None:
    beats: list[Heartbeat] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details[0])
    ended = threading.Event()

    def transfer(progress: ProgressCallback) -> None:
        sent = 0
        try:
            while True:  # until the cancel makes `progress` raise
                sent += 1 << 20
                progress(TransferProgress(sent, 1 << 40, sent, 1.0))
                time.sleep(0.01)
        finally:
            ended.set()

    async def cancel_soon() -> None:
        await asyncio.sleep(1.5)
        env.cancel()

    canceller = asyncio.create_task(cancel_soon())
    with pytest.raises(asyncio.CancelledError):
        await env.run(in_thread, "upload", transfer)
    await canceller
    assert ended.is_set()  # the thread ended before the activity did
    assert beats and beats[-1].stage == "upload" and beats[-1].bytes_total == 1 << 40
    assert beats[-1].bytes is not None and beats[-1].bytes > 0 and beats[-1].rate
