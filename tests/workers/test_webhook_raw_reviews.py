"""Raw requests to the webhook that no API server would send: malformed, oversized, of the
wrong kind or operation. Each gets a specific refusal (or, for what the webhook does not
review, an answer that changes nothing), and nothing is read on their behalf."""

from __future__ import annotations

import io
import json
import ssl
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from api.restore_pods import RestoreSettings
from workers.settings import WebhookSettings
from workers.webhook import (
    MUTATE_PATH,
    VALIDATE_PATH,
    admission_app,
    self_signed_certificate,
    server_ssl_context,
    serving,
)

pytestmark = pytest.mark.timeout(60)


class Hook:
    def __init__(self, url: str, context: ssl.SSLContext) -> None:
        self.url, self.context = url, context
        self.reads: list[tuple[str, str]] = []

    async def post(self, path: str, body: bytes) -> tuple[int, str]:
        headers = {"Content-Type": "application/json"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{self.url}{path}", data=io.BytesIO(body), headers=headers, ssl=self.context
            ) as r,
        ):
            return r.status, await r.text()


@pytest_asyncio.fixture
async def hook(tmp_path: Path) -> AsyncIterator[Hook]:
    cert, key = self_signed_certificate(hosts=["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    settings = WebhookSettings(
        host="127.0.0.1",
        port=0,
        cert_file=str(tmp_path / "tls.crt"),
        key_file=str(tmp_path / "tls.key"),
    )
    context = ssl.create_default_context(cafile=str(tmp_path / "tls.crt"))
    found: Hook | None = None

    async def read(namespace: str, name: str) -> None:
        assert found is not None
        found.reads.append((namespace, name))

    app = admission_app(read=read, settings=RestoreSettings())
    async with serving(app, settings=settings, context=server_ssl_context(settings)) as port:
        found = Hook(f"https://127.0.0.1:{port}", context)
        yield found


def review(request: dict[str, Any]) -> bytes:
    body = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    return json.dumps(body).encode()


POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "p",
        "namespace": "team-b",
        "annotations": {"warmstart.dev/restore-from": "llama"},
    },
    "spec": {"containers": [{"name": "main", "image": "i", "command": ["serve"]}]},
}


@pytest.mark.parametrize("path", [MUTATE_PATH, VALIDATE_PATH])
@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"{not json", 400, "expected an AdmissionReview (JSON)"),
        (b"[1, 2, 3]", 400, "expected an AdmissionReview with request.uid"),
        (b'{"request": "x"}', 400, "expected an AdmissionReview with request.uid"),
        (review({"kind": {"kind": "Pod"}}), 400, "expected an AdmissionReview with request.uid"),
        (b" " * (3 << 20), 413, "Maximum request body size 1048576 exceeded"),
    ],
    ids=["not-json", "not-an-object", "request-not-an-object", "no-uid", "oversized"],
)
async def test_a_malformed_review_is_refused_by_name(
    hook: Hook, path: str, body: bytes, status: int, says: str
) -> None:
    code, text = await hook.post(path, body)
    assert (code, says in text) == (status, True), text[:300]
    assert hook.reads == []


@pytest.mark.parametrize(
    "request_",
    [
        {
            "kind": {"group": "apps", "version": "v1", "kind": "Deployment"},
            "operation": "CREATE",
            "object": {"kind": "Deployment", "metadata": {"name": "d", "namespace": "team-b"}},
        },
        {
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "UPDATE",
            "object": POD,
            "namespace": "team-b",
        },
        {
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "DELETE",
            "oldObject": POD,
            "namespace": "team-b",
        },
    ],
    ids=["wrong-kind", "pod-update", "pod-delete"],
)
async def test_what_the_webhook_does_not_review_is_answered_unchanged(
    hook: Hook, request_: dict[str, Any]
) -> None:
    uid = str(uuid.uuid4())
    code, text = await hook.post(MUTATE_PATH, review({"uid": uid, **request_}))
    assert code == 200, text
    response = json.loads(text)["response"]
    assert response["uid"] == uid and response["allowed"] is True
    assert "patch" not in response  # nothing changed
    assert hook.reads == []  # nothing read on its behalf
