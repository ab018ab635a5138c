"""The node's S3 clients: one per endpoint, region and credentials; the worker's own
endpoint for locations that name none; credentials from a named Secret, checked."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping

import pytest
from temporalio.testing import ActivityEnvironment

from activities.contracts import Heartbeat
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
        transfer=TransferSettings(), endpoint="http://s3.local:9000", region="eu-west-1"
    )
    one, two = stores.backend(PLAIN), stores.backend(PLAIN.model_copy(update={"prefix": "x"}))
    client = one._s3._client
    assert client is two._s3._client
    assert (client.meta.endpoint_url, client.meta.region_name) == (
        "http://s3.local:9000",
        "eu-west-1",
    )
    own = stores.backend(PLAIN.model_copy(update={"endpoint": "http://other:9000"}))
    assert own._s3._client.meta.endpoint_url == "http://other:9000"


def test_a_named_secret_gives_the_clients_keys() -> None:
    found = secrets({"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t"})
    stores = RemoteStores(transfer=TransferSettings(), read_secret=lambda ns, n: found[(ns, n)])
    keys = stores.backend(WITH_SECRET)._s3._client._request_signer._credentials
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
    assert (kms.settings.sse, kms.settings.kms_key_id, kms.settings.part_size) == (
        "aws:kms",
        "alias/k",
        8 << 20,
    )


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
