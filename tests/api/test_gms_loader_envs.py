"""The `warmstart.dev/gms-loader` annotation's envs as Kubernetes EnvVars: a `valueFrom`
reaches the gms-loader container as written, through the same model and merge as the
saver's (tests/api/test_jobs.py). The shaping is called directly here; the webhook around
it is tested in tests/workers/test_webhook.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.errors import InvalidSpecError
from api.jobs import JobSettings
from api.resources import ENV_ONE_SOURCE, ENV_VALUE_AND_SOURCE
from api.restore_pods import GMS_LOADER, RestoreSettings, restore_pod

CKPT_ID, VERSION = "96429b2725761a09", "20261127T120000Z-abcdef"
SETTINGS = RestoreSettings(jobs=JobSettings(checkpoint_claim="ckpts"))
MAIN = {"name": "main", "image": "vllm/vllm-openai:v0.8.0", "command": ["vllm", "serve"]}
CHECKPOINT = {
    "apiVersion": "warmstart.dev/v1alpha1",
    "kind": "Checkpoint",
    "metadata": {"name": "llama", "namespace": "inference"},
    "spec": {
        "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
        "job": {"podTemplateSpec": {"spec": {"containers": [MAIN]}}},
        "gpuMemoryService": {"enabled": True},
    },
    "status": {"phase": "Ready", "checkpointID": CKPT_ID, "version": VERSION},
}
WHERE = "metadata.annotations[warmstart.dev/gms-loader]: "


def shaped(override: dict[str, Any]) -> dict[str, Any]:
    """The gms-loader container of a restore target asking for `override`."""
    annotations = {
        "warmstart.dev/restore-from": "llama",
        "warmstart.dev/gms-loader": json.dumps(override),
    }
    pod = {
        "metadata": {"name": "llama-0", "namespace": "inference", "annotations": annotations},
        "spec": {"containers": [MAIN]},
    }
    spec = restore_pod(pod, checkpoint=CHECKPOINT, settings=SETTINGS)["spec"]
    return next(c for c in spec["containers"] if c["name"] == GMS_LOADER)


def test_loader_envs_from_secrets_config_maps_and_fields_reach_the_loader() -> None:
    envs = [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        {"name": "CHUNK", "valueFrom": {"configMapKeyRef": {"name": "gms", "key": "chunk"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "GMS_LOAD_WORKERS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]
    loader = shaped({"envs": envs})
    assert (
        loader["env"]
        == [
            {"name": "GMS_SOCKET_DIR", "value": "/gms-intrapod-control"},
            {
                "name": "GMS_CHECKPOINT_DIR",
                "value": f"/checkpoints/gms/{CKPT_ID}/versions/{VERSION}",
            },
            {"name": "GMS_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            envs[4],  # the default's value replaced by the override's valueFrom, in its place
            *envs[:4],
        ]
    )


def test_the_loader_may_not_source_the_operators_env() -> None:
    source = {"secretKeyRef": {"name": "s", "key": "k"}}
    loader = shaped({"envs": [{"name": "GMS_SOCKET_DIR", "valueFrom": source}]})
    assert loader["env"][0] == {"name": "GMS_SOCKET_DIR", "value": "/gms-intrapod-control"}


@pytest.mark.parametrize(
    ("env", "says"),
    [
        (
            {"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            f"envs.0: {ENV_VALUE_AND_SOURCE}",
        ),
        ({"name": "A", "valueFrom": {}}, f"envs.0.valueFrom: {ENV_ONE_SOURCE}"),
        (
            {"name": "A", "valueFrom": {"secretKeyRef": {"key": "k"}}},
            "envs.0.valueFrom.secretKeyRef.name: Field required",
        ),
    ],
)
def test_a_bad_loader_env_is_refused_naming_the_field(env: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidSpecError) as err:
        shaped({"envs": [env]})
    assert str(err.value) == WHERE + says
