"""The one error mapping of Kubernetes calls (activities.kube.client): the real `kubernetes`
client over HTTP against kmock answering each status, a port where nothing listens, a
server that never answers, and a real kube-apiserver refusing for real."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from kubernetes import client

from activities.kube.client import (
    ApiCall,
    api_client,
    authorization,
    call,
    call_sync,
    configuration,
)
from api.errors import (
    ConflictError,
    ExpiredError,
    ForbiddenError,
    InvalidSpecError,
    NotFoundError,
    UnavailableError,
    WarmstartError,
)
from api.reasons import Reason
from tests.apiserver import ApiServer, installed, needs_apiserver, running_apiserver
from tests.kube import Cluster, start_cluster
from workers.settings import KubeSettings

READ = ApiCall("read", "Pod", "inference", "llama-0")


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


def answering(cluster: Cluster, status: int, reason: str = "") -> None:
    """The API server answers the pod's read with `status` (and a Status object)."""
    assert cluster.emulator is not None
    body = {"kind": "Status", "apiVersion": "v1", "code": status, "reason": reason}
    body["message"] = f"the API server's own words ({reason or status})"
    cluster.emulator["get /api/v1/namespaces/inference/pods/llama-0"] << status << body


@pytest.mark.parametrize(
    ("status", "reason", "error", "retryable", "message"),
    [
        (404, "NotFound", NotFoundError, False, "read Pod inference/llama-0: not found"),
        (409, "Conflict", ConflictError, True, "read Pod inference/llama-0: changed meanwhile"),
        (
            401,
            "Unauthorized",
            ForbiddenError,
            False,
            "read Pod inference/llama-0: unauthorized (401): the API server rejected our "
            "credentials",
        ),
        (
            403,
            "Forbidden",
            ForbiddenError,
            False,
            "forbidden (403): this worker may not read Pod inference/llama-0 (the RBAC rules "
            "of its service account)",
        ),
        (
            410,
            "Expired",
            ExpiredError,
            True,
            "read Pod inference/llama-0: expired (the API server's own words (Expired))",
        ),
        (
            429,
            "TooManyRequests",
            UnavailableError,
            True,
            "read Pod inference/llama-0: API server answered 429 TooManyRequests",
        ),
        (
            500,
            "InternalError",
            UnavailableError,
            True,
            "read Pod inference/llama-0: API server answered 500 InternalError",
        ),
        (
            503,
            "ServiceUnavailable",
            UnavailableError,
            True,
            "read Pod inference/llama-0: API server answered 503 ServiceUnavailable",
        ),
        (
            422,
            "Invalid",
            InvalidSpecError,
            False,
            "read Pod inference/llama-0: 422 the API server's own words (Invalid)",
        ),
    ],
)
async def test_each_answer_of_the_api_server_maps_to_one_error_of_ours(
    cluster: Cluster,
    status: int,
    reason: str,
    error: type[WarmstartError],
    retryable: bool,
    message: str,
) -> None:
    answering(cluster, status, reason)
    with pytest.raises(error) as raised:
        await call(cluster.core.read_namespaced_pod, "llama-0", "inference", on=READ)
    assert type(raised.value) is error
    assert raised.value.retryable is retryable
    assert raised.value.message == message
    # The synchronous form maps the same way.
    with pytest.raises(error):
        await asyncio.to_thread(
            call_sync, cluster.core.read_namespaced_pod, "llama-0", "inference", on=READ
        )


async def test_forbidden_has_a_reason_of_its_own(cluster: Cluster) -> None:
    answering(cluster, 403, "Forbidden")
    with pytest.raises(ForbiddenError) as raised:
        await call(cluster.core.read_namespaced_pod, "llama-0", "inference", on=READ)
    assert raised.value.reason == Reason.FORBIDDEN


async def test_already_exists_is_a_conflict_that_says_so(cluster: Cluster) -> None:
    body = {"metadata": {"name": "llama-0"}, "spec": {"containers": [{"name": "m", "image": "x"}]}}
    create = ApiCall("create", "Pod", "inference", "llama-0")
    await call(cluster.core.create_namespaced_pod, "inference", body, on=create)
    with pytest.raises(ConflictError) as raised:
        await call(cluster.core.create_namespaced_pod, "inference", body, on=create)
    assert raised.value.exists
    assert raised.value.message == "create Pod inference/llama-0: already exists"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_an_api_server_that_is_not_there_is_unavailable() -> None:
    login = KubeSettings(server=f"http://127.0.0.1:{_closed_port()}")
    api = api_client(login)
    api.configuration.retries = 0
    try:
        with pytest.raises(UnavailableError) as raised:
            await call(client.CoreV1Api(api).read_namespaced_pod, "llama-0", "inference", on=READ)
    finally:
        api.close()  # type: ignore[no-untyped-call]
    assert raised.value.retryable
    assert raised.value.message.startswith("read Pod inference/llama-0: API server unreachable:")


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


async def test_an_api_server_that_does_not_answer_in_time_is_unavailable(
    silent_server: str,
) -> None:
    api = api_client(KubeSettings(server=silent_server))
    try:
        with pytest.raises(UnavailableError) as raised:
            await call(
                client.CoreV1Api(api).read_namespaced_pod,
                "llama-0",
                "inference",
                on=READ,
                timeout=0.5,
            )
    finally:
        api.close()  # type: ignore[no-untyped-call]
    assert "read Pod inference/llama-0: API server unreachable" in raised.value.message


def test_the_login_reads_the_token_file_each_time(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    login = KubeSettings(server="https://kube:6443", token_file=str(token))
    assert configuration(login).api_key == {"authorization": "Bearer first"}
    token.write_text("rotated\n")
    rotated = configuration(login)
    assert rotated.api_key == {"authorization": "Bearer rotated"}
    assert (rotated.host, rotated.verify_ssl) == ("https://kube:6443", True)


# --- the real API server -------------------------------------------------------------


@pytest.fixture(scope="module")
def apiserver() -> Iterator[ApiServer]:
    yield from running_apiserver()


@needs_apiserver
async def test_a_real_api_server_refuses_as_mapped(apiserver: ApiServer, tmp_path: Path) -> None:
    kube = await installed(apiserver, ("inference",))
    try:
        name = f"llama-{uuid.uuid4().hex[:6]}"
        on = ApiCall("read", "Pod", "inference", name)
        with pytest.raises(NotFoundError):
            await call(kube.core.read_namespaced_pod, name, "inference", on=on)
        body = {"metadata": {"name": name}, "spec": {"containers": [{"name": "m", "image": "x"}]}}
        create = ApiCall("create", "Pod", "inference", name)
        await call(kube.core.create_namespaced_pod, "inference", body, on=create)
        with pytest.raises(ConflictError) as conflict:
            await call(kube.core.create_namespaced_pod, "inference", body, on=create)
        assert conflict.value.exists
        invalid = {"metadata": {"name": "no-containers"}, "spec": {"containers": []}}
        with pytest.raises(InvalidSpecError) as refused:
            await call(kube.core.create_namespaced_pod, "inference", invalid, on=create)
        assert "spec.containers: Required value" in refused.value.message
    finally:
        kube.close()
    wrong = tmp_path / "token"
    wrong.write_text("not-the-token")
    login = KubeSettings(server=apiserver.url, token_file=str(wrong), insecure_skip_tls_verify=True)
    api = api_client(login)
    try:
        with pytest.raises(ForbiddenError) as rejected:
            await call(client.CoreV1Api(api).read_namespaced_pod, name, "inference", on=on)
    finally:
        api.close()  # type: ignore[no-untyped-call]
    assert "unauthorized (401)" in rejected.value.message


def test_the_authorization_header_is_the_logins_whichever_key_holds_it() -> None:
    ours = configuration(KubeSettings(server="https://kube:6443"))
    assert authorization(ours) == ""
    ours.api_key = {"authorization": "Bearer abc"}
    assert authorization(ours) == "Bearer abc"
    in_cluster = client.Configuration()  # as the service account's loader fills it in
    in_cluster.api_key = {"BearerToken": "bearer sa-token"}
    assert authorization(in_cluster) == "bearer sa-token"
