"""Shaping the capture Job: pure functions, checked field by field and as a V1Job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, V1Job

from api.jobs import (
    CONTROL_DIR,
    GMS_SAVER,
    GMS_SERVER,
    SECCOMP_PROFILE,
    JobSettings,
    capture_job,
    job_name,
    merge_override,
)
from api.resources import Checkpoint, ContainerOverride

REPO = Path(__file__).resolve().parents[2]
VERSION = "20261127T120000Z-abcdef"
SETTINGS = JobSettings(checkpoint_claim="ckpts")


def resource(**spec: Any) -> Checkpoint:
    main = {
        "name": "main",
        "image": "vllm/vllm-openai:v0.8.0",
        "args": ["--model", "meta-llama/Llama-2-7b-hf"],
        "env": [{"name": "HF_HOME", "value": "/models"}],
        "livenessProbe": {"httpGet": {"path": "/health", "port": 8000}},
        "startupProbe": {"httpGet": {"path": "/health", "port": 8000}},
        "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}},
    }
    template = {
        "metadata": {"labels": {"app": "llama"}},
        "spec": {"containers": [main, {"name": "metrics", "image": "exporter:1"}]},
    }
    body = {
        "metadata": {"name": "llama", "namespace": "inference", "uid": "uid-1"},
        "spec": {
            "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
            "job": {"podTemplateSpec": template, "activeDeadlineSeconds": 1800},
            **spec,
        },
    }
    return Checkpoint.model_validate(body)


def container(job: dict[str, Any], name: str, kind: str = "containers") -> dict[str, Any]:
    return next(c for c in job["spec"]["template"]["spec"][kind] if c["name"] == name)


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_the_job_runs_once_with_its_deadline_and_labels() -> None:
    job = capture_job(resource(), version=VERSION, settings=SETTINGS)
    spec = job["spec"]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (0, 1800)
    assert spec["ttlSecondsAfterFinished"] == 300
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    labels = {
        "warmstart.dev/checkpoint": "llama",
        "warmstart.dev/checkpoint-id": "96429b2725761a09",
        "warmstart.dev/checkpoint-uid": "uid-1",
    }
    assert job["metadata"]["labels"] == labels
    assert spec["template"]["metadata"]["labels"] == {"app": "llama", **labels}
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations == {
        "sidecar.istio.io/inject": "false",
        "linkerd.io/inject": "disabled",
        "warmstart.dev/target-container": "main",
    }
    [owner] = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("Checkpoint", "uid-1", True)
    assert job["metadata"]["name"] == "llama-96429b2725761a09"


def test_the_target_waits_for_the_sentinel_and_keeps_no_probes_of_its_own() -> None:
    job = capture_job(resource(), version=VERSION, settings=SETTINGS)
    main = container(job, "main")
    assert "livenessProbe" not in main and "startupProbe" not in main
    assert main["readinessProbe"]["exec"]["command"] == ["cat", f"{CONTROL_DIR}/ready-for-snapshot"]
    # Both names: Dynamo 1.6's worker code enters snapshot mode on DYN_SNAPSHOT_CONTROL_DIR.
    assert env(main) == {
        "HF_HOME": "/models",
        "SNAPSHOT_CONTROL_DIR": CONTROL_DIR,
        "DYN_SNAPSHOT_CONTROL_DIR": CONTROL_DIR,
    }
    assert {"name": "snapshot-control", "mountPath": CONTROL_DIR, "subPath": "main"} in main[
        "volumeMounts"
    ]
    assert main["securityContext"]["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": SECCOMP_PROFILE,
    }
    assert main["args"] == ["--model", "meta-llama/Llama-2-7b-hf"]  # no GMS: no load format
    others = container(job, "metrics")
    assert others == {"name": "metrics", "image": "exporter:1"}  # only the target is shaped
    assert {"name": "snapshot-control", "emptyDir": {}} in job["spec"]["template"]["spec"][
        "volumes"
    ]


def test_the_template_of_the_resource_is_not_changed() -> None:
    checkpoint = resource()
    before = json.dumps(checkpoint.spec.job.pod_template_spec, sort_keys=True)
    capture_job(checkpoint, version=VERSION, settings=SETTINGS)
    assert json.dumps(checkpoint.spec.job.pod_template_spec, sort_keys=True) == before


def test_gms_adds_the_server_sidecar_and_the_saver() -> None:
    job = capture_job(
        resource(gpuMemoryService={"enabled": True}), version=VERSION, settings=SETTINGS
    )
    server = container(job, GMS_SERVER, "initContainers")
    assert server["restartPolicy"] == "Always" and "startupProbe" in server
    saver = container(job, GMS_SAVER)
    assert saver["image"] == "vllm/vllm-openai:v0.8.0"  # the target's image by default
    assert saver["command"] == ["python3", "-m", "gpu_memory_service.cli.snapshot.saver"]
    assert (
        env(saver)["GMS_CHECKPOINT_DIR"] == f"/checkpoints/gms/96429b2725761a09/versions/{VERSION}"
    )
    assert env(saver)["GMS_SOCKET_DIR"] == env(container(job, "main"))["GMS_SOCKET_DIR"]
    mounts = {m["mountPath"]: m for m in saver["volumeMounts"]}
    assert mounts[CONTROL_DIR]["subPath"] == "main"  # its sentinel lands in the target's dir
    claim = {"name": "checkpoint-storage", "persistentVolumeClaim": {"claimName": "ckpts"}}
    assert claim in job["spec"]["template"]["spec"]["volumes"]
    assert container(job, "main")["args"][-2:] == ["--load-format", "gms"]


def test_a_chosen_load_format_is_kept() -> None:
    checkpoint = resource(gpuMemoryService={"enabled": True})
    main = checkpoint.spec.job.pod_template_spec["spec"]["containers"][0]
    main["args"] = [*main["args"], "--load-format=safetensors"]
    job = capture_job(checkpoint, version=VERSION, settings=SETTINGS)
    assert container(job, "main")["args"][-1] == "--load-format=safetensors"


def test_sglang_gets_no_vllm_flag() -> None:
    identity = {"model": "m", "backendFramework": "sglang"}
    job = capture_job(
        resource(identity=identity, gpuMemoryService={"enabled": True}),
        version=VERSION,
        settings=SETTINGS,
    )
    assert "--load-format" not in container(job, "main")["args"]


BASE = {
    "name": GMS_SAVER,
    "image": "base:1",
    "command": ["python3", "-m", "saver"],
    "args": ["--x"],
    "env": [
        {"name": "GMS_SOCKET_DIR", "value": "/gms"},
        {"name": "B", "value": "base"},
        {"name": "A", "value": "base"},
    ],
    "volumeMounts": [{"name": "gms", "mountPath": "/gms"}],
}


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (None, BASE),
        ({}, BASE),
        ({"image": "mine:2"}, {**BASE, "image": "mine:2"}),
        (
            {"command": ["/bin/saver", "--fast"]},
            {k: v for k, v in BASE.items() if k != "args"} | {"command": ["/bin/saver", "--fast"]},
        ),
        (
            {
                "envs": [
                    {"name": "A", "value": "mine"},
                    {"name": "GMS_SOCKET_DIR", "value": "/elsewhere"},
                    {"name": "C", "value": "new"},
                ]
            },
            {
                **BASE,
                "env": [
                    {"name": "GMS_SOCKET_DIR", "value": "/gms"},
                    {"name": "B", "value": "base"},
                    {"name": "A", "value": "mine"},
                    {"name": "C", "value": "new"},
                ],
            },
        ),
        (
            {
                "envs": [
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                    {"name": "GMS_SOCKET_DIR", "valueFrom": {"fieldRef": {"fieldPath": "x"}}},
                    {"name": "C", "value": ""},
                ]
            },
            {
                **BASE,
                "env": [
                    {"name": "GMS_SOCKET_DIR", "value": "/gms"},  # still the operator's
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                    {"name": "A", "value": "base"},
                    {"name": "C", "value": ""},
                ],
            },
        ),
        ({"envFromSecret": ""}, BASE),
        ({"envFromSecret": "hf-token"}, {**BASE, "envFrom": [{"secretRef": {"name": "hf-token"}}]}),
        (
            {"volumeMounts": [{"name": "cache", "mountPath": "/cache", "readOnly": True}]},
            {
                **BASE,
                "volumeMounts": [
                    *BASE["volumeMounts"],
                    {"name": "cache", "mountPath": "/cache", "readOnly": True},
                ],
            },
        ),
    ],
)
def test_saver_override_merge(override: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    parsed = None if override is None else ContainerOverride.model_validate(override)
    assert merge_override(BASE, parsed) == expected


SOURCED_ENVS = [
    {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
    {
        "name": "GMS_CHUNK_MB",
        "valueFrom": {"configMapKeyRef": {"name": "gms", "key": "chunk", "optional": True}},
    },
    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName", "apiVersion": "v1"}}},
    {
        "name": "MEM_MB",
        "valueFrom": {
            "resourceFieldRef": {
                "containerName": "main",
                "resource": "limits.memory",
                "divisor": "1Mi",
            }
        },
    },
    {"name": "GMS_POD_UID", "value": "fixed"},  # replaces the default's valueFrom entirely
]


def test_saver_envs_from_secrets_config_maps_and_fields_reach_the_job() -> None:
    gms = {"enabled": True, "checkpoint": {"saver": {"envs": SOURCED_ENVS}}}
    job = capture_job(resource(gpuMemoryService=gms), version=VERSION, settings=SETTINGS)
    saver = container(job, GMS_SAVER)
    assert saver["env"] == [
        {"name": "GMS_SOCKET_DIR", "value": "/gms-intrapod-control"},
        {
            "name": "GMS_CHECKPOINT_DIR",
            "value": f"/checkpoints/gms/96429b2725761a09/versions/{VERSION}",
        },
        {"name": "GMS_POD_UID", "value": "fixed"},
        *SOURCED_ENVS[:4],
    ]
    parsed = ApiClient()._ApiClient__deserialize(job, "V1Job")  # type: ignore[attr-defined]
    assert ApiClient().sanitize_for_serialization(parsed) == job  # nothing Kubernetes drops


def test_jobs_are_valid_kubernetes_jobs() -> None:
    for gms in ({}, {"enabled": True, "checkpoint": {"saver": {"image": "s:1"}}}):
        job = capture_job(resource(gpuMemoryService=gms), version=VERSION, settings=SETTINGS)
        parsed = ApiClient()._ApiClient__deserialize(job, "V1Job")  # type: ignore[attr-defined]
        assert isinstance(parsed, V1Job)
        assert ApiClient().sanitize_for_serialization(parsed) == job


def test_job_names_fit_a_label() -> None:
    long = resource()
    long = long.model_copy(update={"metadata": long.metadata.model_copy(update={"name": "a" * 63})})
    assert len(job_name(long)) <= 63


def test_the_seccomp_profile_blocks_io_uring() -> None:
    profile = json.loads((REPO / "deploy/seccomp/block-io-uring.json").read_text())
    [rule] = profile["syscalls"]
    assert set(rule["names"]) == {"io_uring_setup", "io_uring_enter", "io_uring_register"}
    assert rule["action"] == "SCMP_ACT_ERRNO" and profile["defaultAction"] == "SCMP_ACT_ALLOW"
    assert SECCOMP_PROFILE.endswith("block-io-uring.json")
