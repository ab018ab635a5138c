"""The payload codec: histories hold ciphertext only, and the pipeline still works."""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from pathlib import Path

import pytest
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.storage.store import CheckpointStore
from api.errors import InvalidSpecError, PipelineFailedError
from api.identity import CheckpointIdentity
from api.naming import capture_workflow_id, node_task_queue
from api.reasons import Reason
from api.workload import LocalWorkload, SecretRef
from tests.conftest import needs_criu
from tests.pipeline import capture, capture_request, shell_workload
from tests.workflows.test_capture_workflow import StandIns
from workers.client import data_converter
from workers.codec import ENCODING, EncryptionCodec, load_key
from workers.compose import control_worker, node_worker
from workers.settings import NodeSettings, Settings, TemporalSettings
from workflows.capture import CaptureWorkflow
from workflows.contracts import CaptureRequest

SECRET = "hf_planted_token_4d2a"


def _key_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "codec.key"
    path.write_text(text)
    return str(path)


async def test_payloads_round_trip_and_old_ones_pass_through() -> None:
    codec = EncryptionCodec(bytes(range(32)))
    plain = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(SECRET).encode())
    [sealed] = await codec.encode([plain])
    assert sealed.metadata["encoding"] == ENCODING and SECRET.encode() not in sealed.data
    assert await codec.decode([sealed]) == [plain]
    assert await codec.decode([plain]) == [plain]  # written before the codec was on


async def test_another_key_or_an_altered_payload_is_refused() -> None:
    [sealed] = await EncryptionCodec(bytes(range(32))).encode([Payload(data=b"x")])
    with pytest.raises(InvalidSpecError, match="sealed with key"):
        await EncryptionCodec(bytes(32)).decode([sealed])
    altered = Payload(metadata=sealed.metadata, data=sealed.data[:-1] + b"\0")
    with pytest.raises(InvalidSpecError, match="failed authentication"):
        await EncryptionCodec(bytes(range(32))).decode([altered])


def test_key_files(tmp_path: Path) -> None:
    assert load_key(_key_file(tmp_path, "ab" * 32 + "\n")) == bytes([0xAB]) * 32
    with pytest.raises(InvalidSpecError, match="expected 32 bytes or 64 hex digits"):
        load_key(_key_file(tmp_path, "short"))
    with pytest.raises(InvalidSpecError, match="No such file"):
        load_key(str(tmp_path / "missing"))


async def test_a_capture_leaves_no_plaintext_in_its_history(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    settings = Settings(temporal=TemporalSettings(codec_key_file=_key_file(tmp_path, "cd" * 32)))
    target = temporal_env.client.service_client.config.target_host
    sealed = await Client.connect(target, data_converter=data_converter(settings))
    suffix = uuid.uuid4().hex[:8]
    control, node = f"control-{suffix}", f"node-{suffix}"
    stand_ins = StandIns()
    workload = LocalWorkload(
        name="llama", command=("serve", "--token", SECRET), cwd="/", env={"HF_TOKEN": SECRET}
    )
    identity = CheckpointIdentity(model="m/llama", backend_framework="vllm")
    request = CaptureRequest.local(workload, identity, node=node, control_task_queue=control)
    async with (
        Worker(
            sealed, task_queue=control, workflows=[CaptureWorkflow], activities=stand_ins.control()
        ),
        Worker(sealed, task_queue=node_task_queue(node), activities=stand_ins.node()),
    ):
        handle = await sealed.start_workflow(
            CaptureWorkflow.run, request, id=f"capture/test/{suffix}", task_queue=control
        )
        result = await handle.result()
    assert result.checkpoint_id == request.checkpoint_id  # the pipeline ran, sealed

    assert temporal_env.client.data_converter.payload_codec is None  # reads raw history
    history = await temporal_env.client.get_workflow_handle(handle.id).fetch_history()
    raw = json.dumps(history.to_json_dict())
    payloads = [base64.b64decode(d) for d in _payload_data(history.to_json_dict())]
    assert payloads, "the history has payloads"
    assert SECRET not in raw and all(SECRET.encode() not in p for p in payloads)
    assert all(b"llama" not in p for p in payloads)


def _payload_data(value: object) -> list[str]:
    if isinstance(value, dict):
        found = [value["data"]] if "data" in value and "metadata" in value else []
        return found + [d for v in value.values() for d in _payload_data(v)]
    if isinstance(value, list):
        return [d for v in value for d in _payload_data(v)]
    return []


@needs_criu
async def test_a_planted_secret_is_in_no_history_log_line_manifest_or_status(
    temporal_env: WorkflowEnvironment, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Real workers with the codec on: a workload gets a secret from the node's secrets
    directory; one capture succeeds, one fails quoting the secret in its output. The
    secret is in no raw history (failure messages and stack traces are sealed too), no
    log line of the workers, no manifest and no status record."""
    suffix = uuid.uuid4().hex[:8]
    settings = Settings(
        home=tmp_path / "home",
        temporal=TemporalSettings(codec_key_file=_key_file(tmp_path, "ef" * 32)),
        node=NodeSettings(name=f"test-{suffix}", control_task_queue=f"warmstart-control-{suffix}"),
    )
    (settings.home / "secrets").mkdir(parents=True)
    (settings.home / "secrets" / "hf").write_text(SECRET)
    secret_env = {"HF_TOKEN": SecretRef(file="hf")}
    served = shell_workload(
        "sealed-ok", "echo ready > $SNAPSHOT_CONTROL_DIR/ready-for-snapshot; exec sleep 600"
    ).model_copy(update={"secret_env": secret_env})
    failing = shell_workload(
        "sealed-fails", 'echo "loading weights with $HF_TOKEN" >&2; exit 3'
    ).model_copy(update={"secret_env": secret_env})
    target = temporal_env.client.service_client.config.target_host
    sealed = await Client.connect(target, data_converter=data_converter(settings))
    caplog.set_level(logging.DEBUG)
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    async with control_worker(sealed, settings), node_worker(sealed, settings, base_env=base_env):
        result = await capture(sealed, capture_request(settings, served))
        failed_request = capture_request(settings, failing)
        with pytest.raises(PipelineFailedError) as failed:
            await capture(sealed, failed_request)

    # The sealed client reads the failure back, the secret masked in the output tail.
    assert failed.value.reason == Reason.WORKLOAD_EXITED
    assert "exited with status 3" in failed.value.message and "loading weights" in str(failed.value)
    assert SECRET not in str(failed.value)
    for request, seen in (
        (capture_request(settings, served), result.checkpoint_id),
        (failed_request, failed_request.checkpoint_id),
    ):
        workflow_id = capture_workflow_id(namespace="local", name=request.name, key=seen)
        history = await temporal_env.client.get_workflow_handle(workflow_id).fetch_history()
        raw = json.dumps(history.to_json_dict())
        payloads = [base64.b64decode(d) for d in _payload_data(history.to_json_dict())]
        assert SECRET not in raw and all(SECRET.encode() not in p for p in payloads)
        # Failure messages are sealed too, not only inputs and results.
        assert "exited with status" not in raw and "Traceback" not in raw
    manifest = (CheckpointStore(settings.checkpoint_root).find(result.checkpoint_id)).parent
    texts = [p.read_text(errors="replace") for p in manifest.rglob("manifest.json")]
    texts += [p.read_text() for p in (settings.home / "status").rglob("*.json")]
    assert texts and all(SECRET not in text for text in texts)
    assert caplog.records and SECRET not in caplog.text
