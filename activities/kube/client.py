"""The one way this code talks to the API server: the login, every call, one error mapping.

`configuration(login)` is the one login: the API server of `login.server` (a bearer token
file, TLS verified unless told otherwise), else the pod's service account, else the
kubeconfig. The `kubernetes` client (`api_client`), the watch (`activities.kube.watch`) and
kopf (`workers.watcher`) all start from it.

`call` runs a call of the synchronous `kubernetes` client in a thread (`call_sync` in the
caller's thread) and maps its failures once, as `api_error` and `transport_error` do for the
watch's own requests; every message names the call (verb, kind, namespace/name):

    404                                      NotFoundError
    409                                      ConflictError (`exists`: AlreadyExists)
    401, 403                                 ForbiddenError
    410                                      ExpiredError (the watch lists again)
    429, 5xx, no status                      UnavailableError
    other refusals (400, 422, ...)           InvalidSpecError, with the API server's message
    connection errors, timeouts (urllib3,
    aiohttp, OSError)                        UnavailableError
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from api.errors import (
    ConflictError,
    ExpiredError,
    ForbiddenError,
    InvalidSpecError,
    NotFoundError,
    UnavailableError,
    WarmstartError,
)

T = TypeVar("T")

# What a call can fail with on its way: the connection, the TLS handshake, a timeout
# (TimeoutError is an OSError).
TRANSPORT_ERRORS = (HTTPError, aiohttp.ClientError, OSError)


class Login(Protocol):
    """Where the API server is and how to prove who we are (`workers.settings.KubeSettings`)."""

    @property
    def server(self) -> str: ...
    @property
    def token_file(self) -> str: ...
    @property
    def insecure_skip_tls_verify(self) -> bool: ...


def configuration(login: Login) -> client.Configuration:
    """The API server of `login.server`, else the pod's service account, else the
    kubeconfig; read afresh on each call (a rotated token file is read again)."""
    configuration = client.Configuration()
    if login.server:
        configuration.host = login.server
        configuration.verify_ssl = not login.insecure_skip_tls_verify
        if login.token_file:
            token = Path(login.token_file).read_text().strip()
            configuration.api_key = {"authorization": f"Bearer {token}"}
        return configuration
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    return configuration


def authorization(configuration: client.Configuration) -> str:
    """The Authorization header of the login ("Bearer <token>"), "" without a token. A
    service account's token is read again when it is due (the client's refresh hook)."""
    value = configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
    return str(value or "")


def api_client(login: Login) -> client.ApiClient:
    """A `kubernetes` client of the one login (close it when done)."""
    return client.ApiClient(configuration(login))


@dataclass(frozen=True)
class ApiCall:
    """What a call does, for its messages: `read Checkpoint inference/llama`, `list pods in
    inference`, `list nodes`."""

    verb: str
    kind: str
    namespace: str = ""
    name: str = ""

    @property
    def where(self) -> str:
        if self.name:
            return f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"in {self.namespace}" if self.namespace else ""

    def __str__(self) -> str:
        return f"{self.verb} {self.kind} {self.where}".rstrip()


async def call(
    fn: Callable[..., T], *args: Any, on: ApiCall, timeout: float | None = None, **kwargs: Any
) -> T:
    """`fn(*args, **kwargs)` (a method of the `kubernetes` client) in a thread, its failures
    mapped (see the module). Past `timeout` seconds it is `UnavailableError`; the call is
    left to finish in its thread."""
    if timeout is not None:
        kwargs["_request_timeout"] = timeout
    try:
        running = asyncio.to_thread(fn, *args, **kwargs)
        return await (running if timeout is None else asyncio.wait_for(running, timeout))
    except ApiException as err:
        raise api_error(on, err.status, err.body, err.reason) from err
    except TRANSPORT_ERRORS as err:
        raise transport_error(on, err) from err


def call_sync(fn: Callable[..., T], *args: Any, on: ApiCall, **kwargs: Any) -> T:
    """`call` in the caller's thread (for callers that are threads already)."""
    try:
        return fn(*args, **kwargs)
    except ApiException as err:
        raise api_error(on, err.status, err.body, err.reason) from err
    except TRANSPORT_ERRORS as err:
        raise transport_error(on, err) from err


def api_error(on: ApiCall, status: int | None, body: Any, reason: str | None) -> WarmstartError:
    """The error of ours for an API server's refusal of `on`: the HTTP `status`, the answer's
    `body` (a Status object, as bytes, text or parsed) and the HTTP `reason`."""
    answer = _status_object(body)
    why = str(answer.get("reason") or reason or "")
    if status == 404:
        return NotFoundError(f"{on}: not found")
    if status == 409:
        exists = why == "AlreadyExists" or on.verb == "create"  # a create's 409 is that
        return ConflictError(
            f"{on}: {'already exists' if exists else 'changed meanwhile'}", exists=exists
        )
    if status == 401:
        return ForbiddenError(f"{on}: unauthorized (401): the API server rejected our credentials")
    if status == 403:
        return ForbiddenError(
            f"forbidden (403): this worker may not {on} (the RBAC rules of its service account)"
        )
    if status == 410:
        return ExpiredError(f"{on}: expired ({answer.get('message') or why or 'Gone'})")
    if not status or status == 429 or status >= 500:
        return UnavailableError(f"{on}: API server answered {status or 'nothing'} {why}".rstrip())
    return InvalidSpecError(f"{on}: {status} {answer.get('message') or why}")


def transport_error(on: ApiCall, err: BaseException) -> UnavailableError:
    """The error of ours for a call that got no answer (or none it could read)."""
    detail = str(err) or type(err).__name__
    return UnavailableError(f"{on}: API server unreachable: {detail}")


def _status_object(body: Any) -> dict[str, Any]:
    """The Status object the API server answers a refusal with; {} if there is none."""
    if isinstance(body, dict):
        return body
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
