"""A cluster node reads a Checkpoint's credentials Secret through the one Kubernetes stack
(workers.compose.secret_reader): the real `kubernetes` client against kmock, which answers
as an API server would, and refuses where told to."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from api.errors import StorageError, UnavailableError
from tests.kube import Cluster, start_cluster
from workers.compose import secret_reader
from workers.settings import KubeSettings, Settings

SECRET_PATH = "/api/v1/namespaces/inference/secrets/s3"


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


async def read(cluster: Cluster, namespace: str = "inference", name: str = "s3") -> object:
    reader = secret_reader(Settings(kube=KubeSettings(server=cluster.url)))
    return await asyncio.to_thread(reader, namespace, name)


async def test_the_secret_is_read_and_decoded(cluster: Cluster) -> None:
    data = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "shh"}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3", "namespace": "inference"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }
    await cluster.run(cluster.core.create_namespaced_secret, "inference", secret)
    assert await read(cluster) == data


async def test_a_missing_secret_is_a_storage_error_naming_it(cluster: Cluster) -> None:
    with pytest.raises(StorageError) as raised:
        await read(cluster, name="nowhere")
    assert not raised.value.retryable
    assert raised.value.message == (
        "S3 credentials cannot be read: read Secret inference/nowhere: not found"
    )


async def test_a_forbidden_secret_says_so(cluster: Cluster) -> None:
    assert cluster.emulator is not None
    cluster.emulator[f"get {SECRET_PATH}"] << 403 << {"kind": "Status", "code": 403}
    with pytest.raises(StorageError) as raised:
        await read(cluster)
    assert raised.value.message == (
        "S3 credentials cannot be read: forbidden (403): this worker may not read Secret "
        "inference/s3 (the RBAC rules of its service account)"
    )


async def test_an_api_server_away_is_retried_not_a_storage_failure(cluster: Cluster) -> None:
    assert cluster.emulator is not None
    cluster.emulator[f"get {SECRET_PATH}"] << 503 << {"kind": "Status", "code": 503}
    with pytest.raises(UnavailableError) as raised:
        await read(cluster)
    assert raised.value.retryable
    assert raised.value.message.startswith("read Secret inference/s3: API server answered 503")
