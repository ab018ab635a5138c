"""Every client and worker reaches Temporal over TLS with a client certificate when the
settings say so, through a real TLS terminator (nginx, proxying gRPC) that requires one; a client
without a certificate, with one from another CA, or speaking plaintext is refused."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from api.errors import InvalidSpecError, UnavailableError
from api.reasons import Phase
from tests.conftest import needs_criu
from tests.pipeline import capture, capture_request, shell_workload
from tests.tls import Pki, make_pki, needs_nginx, tls_terminator
from workers.client import connect
from workers.compose import control_worker, node_worker
from workers.settings import Settings, TemporalSettings

pytestmark = [needs_nginx, pytest.mark.timeout(120)]


def over(settings: Settings, address: str, pki: Pki, **tls: str | None) -> Settings:
    temporal = dataclasses.replace(
        settings.temporal,
        address=address,
        tls_ca_file=str(pki.ca),
        tls_cert_file=str(pki.client_cert),
        tls_key_file=str(pki.client_key),
        tls_server_name="localhost",
    )
    return dataclasses.replace(settings, temporal=dataclasses.replace(temporal, **tls))


def backend(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


@needs_criu
async def test_a_capture_runs_with_every_connection_over_mutual_tls(
    temporal_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    with tls_terminator(backend(temporal_env), pki, tmp_path) as address:
        secure = over(settings, address, pki)
        client = await connect(secure)
        base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        async with control_worker(client, secure), node_worker(client, secure, base_env=base_env):
            script = "echo ready > $SNAPSHOT_CONTROL_DIR/ready-for-snapshot; exec sleep 600"
            result = await capture(client, capture_request(secure, shell_workload("tls", script)))
        assert result.version
        handle = client.get_workflow_handle(f"capture/local/tls/{result.checkpoint_id}")
        described = await handle.describe()
        assert described.status is not None and described.status.name == "COMPLETED"
        assert Phase.READY.value in str(described.typed_search_attributes)
    # Every connection went through the terminator, with the client's certificate.
    access = (tmp_path / "nginx-access.log").read_text()
    assert "/temporal.api.workflowservice.v1.WorkflowService/PollActivityTaskQueue" in access


async def test_a_client_without_the_right_certificate_is_refused(
    temporal_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    with tls_terminator(backend(temporal_env), pki, tmp_path) as address:
        assert (await connect(over(settings, address, pki))).namespace == "default"
        refused = {
            "no client certificate": over(
                settings, address, pki, tls_cert_file=None, tls_key_file=None
            ),
            "another CA's certificate": over(
                settings,
                address,
                pki,
                tls_cert_file=str(pki.other_client_cert),
                tls_key_file=str(pki.other_client_key),
            ),
            "plaintext": dataclasses.replace(settings, temporal=TemporalSettings(address=address)),
        }
        for what, attempt in refused.items():
            with pytest.raises(UnavailableError, match=f"no Temporal server at {address}"):
                await connect(attempt)
            print(f"refused: {what}")


def test_tls_settings_that_cannot_work_are_named(settings: Settings, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    half = over(settings, "127.0.0.1:1", pki, tls_key_file=None)
    with pytest.raises(InvalidSpecError, match="TLS_CERT_FILE and WARMSTART_TEMPORAL__TLS_KEY"):
        from workers.client import tls_config

        tls_config(half)
    missing = over(settings, "127.0.0.1:1", pki, tls_ca_file=str(tmp_path / "absent.pem"))
    with pytest.raises(InvalidSpecError, match=r"TLS_CA_FILE=.*absent\.pem: No such file"):
        tls_config(missing)
    env = {"WARMSTART_TEMPORAL__API_KEY_FILE": str(pki.ca)}
    assert Settings.from_env(env).temporal.uses_tls  # an API key implies TLS


async def test_an_api_key_is_sent_as_a_bearer_token_over_tls(
    temporal_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    key_file = tmp_path / "api-key"
    key_file.write_text("wk-test-0123456789\n")
    with tls_terminator(backend(temporal_env), pki, tmp_path) as address:
        client = await connect(over(settings, address, pki, api_key_file=str(key_file)))
        await client.count_workflows()
    access = (tmp_path / "nginx-access.log").read_text()
    assert "CountWorkflowExecutions Bearer wk-test-0123456789" in access, access[-1000:]
