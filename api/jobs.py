"""Shaping the capture Job of a Checkpoint: pure functions from the resource to a batch/v1
Job manifest (plain dicts, as the Kubernetes API takes them).

The Job runs the user's pod template once (`backoffLimit: 0`, `restartPolicy: Never`),
ready for a dump: the target container gets the control directory and a readiness probe on
the `ready-for-snapshot` sentinel in place of its own probes, no service-mesh sidecar is
injected, io_uring is blocked by a seccomp profile (CRIU cannot dump io_uring), and with
the GPU Memory Service the `gms-server` sidecar and the `gms-saver` container are added.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

from api.dynamo import control_dir_env
from api.naming import capture_workflow_id, is_run_of
from api.reasons import Sentinel
from api.resources import (
    API_VERSION,
    CAPTURE_WORKFLOW_ANNOTATION,
    CHECKPOINT_ID_LABEL,
    CHECKPOINT_LABEL,
    CHECKPOINT_UID_LABEL,
    TARGET_CONTAINER_ANNOTATION,
    Checkpoint,
    ContainerOverride,
)

CONTROL_DIR = "/snapshot-control"
CONTROL_VOLUME = "snapshot-control"
CHECKPOINTS_DIR = "/checkpoints"
CHECKPOINTS_VOLUME = "checkpoint-storage"
GMS_SOCKET_DIR = "/gms-intrapod-control"
GMS_SOCKET_VOLUME = "gms-intrapod-control"
GMS_SERVER, GMS_SAVER = "gms-server", "gms-saver"
SECCOMP_PROFILE = "warmstart/block-io-uring.json"  # under the kubelet's seccomp directory
JOB_TTL_SECONDS = 300
_MESH_OFF = {"sidecar.istio.io/inject": "false", "linkerd.io/inject": "disabled"}
# Set by the operator on every GMS container; an override cannot change it.
_OPERATOR_ENVS = frozenset({"GMS_SOCKET_DIR"})


@dataclass(frozen=True)
class JobSettings:
    """What the operator decides for every capture Job (controller settings)."""

    checkpoint_claim: str = "warmstart-checkpoints"  # the RWX PVC with the checkpoint root
    gms_server_command: tuple[str, ...] = ("python3", "-m", "gpu_memory_service.cli.server")
    gms_saver_command: tuple[str, ...] = (
        "python3",
        "-m",
        "gpu_memory_service.cli.snapshot.saver",
    )
    gms_image: str = ""  # empty: the target container's image


def job_name(resource: Checkpoint, *, workflow_id: str = "") -> str:
    """`<name>-<checkpointID>`, at most 63 characters (pods carry it in a label). A later
    run of the resource's capture (a workflow ID under its first's) gets 8 hex of its ID's
    SHA-256 appended: its own Job, while the last run's may still be there."""
    if not _later_run(resource, workflow_id):
        return f"{resource.metadata.name[:46].rstrip('-.')}-{resource.checkpoint_id}"
    run = hashlib.sha256(workflow_id.encode()).hexdigest()[:8]
    return f"{resource.metadata.name[:37].rstrip('-.')}-{resource.checkpoint_id}-{run}"


def _first_run(resource: Checkpoint) -> str:
    meta = resource.metadata
    return capture_workflow_id(namespace=meta.namespace, name=meta.name, key=meta.uid)


def _later_run(resource: Checkpoint, workflow_id: str) -> bool:
    first = _first_run(resource)
    return workflow_id != first and is_run_of(workflow_id, first)


def capture_job(
    resource: Checkpoint, *, version: str, settings: JobSettings, workflow_id: str = ""
) -> dict[str, Any]:
    """The capture Job of `resource` for checkpoint version `version`, made by the capture
    workflow `workflow_id`: one of the resource's runs is named on the Job and its pod, the
    run the watcher signals."""
    ckpt = resource.checkpoint_id
    if not is_run_of(workflow_id, _first_run(resource)):
        workflow_id = ""
    labels = {
        CHECKPOINT_LABEL: resource.metadata.name,
        CHECKPOINT_ID_LABEL: ckpt,
        CHECKPOINT_UID_LABEL: resource.metadata.uid,
    }
    target_name = resource.spec.job.target_container_name
    template = copy.deepcopy(resource.spec.job.pod_template_spec)
    meta = template.setdefault("metadata", {})
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    meta["annotations"] = {
        **(meta.get("annotations") or {}),
        **_MESH_OFF,
        TARGET_CONTAINER_ANNOTATION: target_name,
        **({CAPTURE_WORKFLOW_ANNOTATION: workflow_id} if workflow_id else {}),
    }
    pod = template.setdefault("spec", {})
    pod["restartPolicy"] = "Never"
    volumes = [v for v in pod.get("volumes") or [] if v.get("name") != CONTROL_VOLUME]
    pod["volumes"] = [*volumes, {"name": CONTROL_VOLUME, "emptyDir": {}}]

    containers = pod["containers"]
    for container in containers:
        if container["name"] == target_name:
            shape_capture_container(container)
    gms = resource.spec.gpu_memory_service
    if gms.enabled:
        saver = gms.checkpoint.saver if gms.checkpoint is not None else None
        target = next(c for c in containers if c["name"] == target_name)
        add_gms(pod, target, ckpt=ckpt, version=version, saver=saver, settings=settings)
        if resource.spec.identity.backend_framework == "vllm":
            use_gms_load_format(target)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(resource, workflow_id=workflow_id),
            "namespace": resource.metadata.namespace,
            "labels": labels,
            "annotations": {CAPTURE_WORKFLOW_ANNOTATION: workflow_id} if workflow_id else {},
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "Checkpoint",
                    "name": resource.metadata.name,
                    "uid": resource.metadata.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": resource.spec.job.active_deadline_seconds,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": template,
        },
    }


def shape_capture_container(container: dict[str, Any]) -> None:
    """The target container, shaped for a capture (in place)."""
    container["env"] = with_control_dir_env(container.get("env") or [])
    container["volumeMounts"] = [
        *(m for m in container.get("volumeMounts") or [] if m.get("mountPath") != CONTROL_DIR),
        control_mount(container["name"]),
    ]
    # Ready means warmed up: the workload's own probes would restart or gate it wrongly.
    container.pop("livenessProbe", None)
    container.pop("startupProbe", None)
    sentinel = f"{CONTROL_DIR}/{Sentinel.READY_FOR_SNAPSHOT.value}"
    container["readinessProbe"] = {
        "exec": {"command": ["cat", sentinel]},
        "periodSeconds": 1,
        "failureThreshold": 1,
    }
    security = container.setdefault("securityContext", {})
    security["seccompProfile"] = {"type": "Localhost", "localhostProfile": SECCOMP_PROFILE}


def with_control_dir_env(envs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`envs` with the control directory in both names workers read (Dynamo's
    `DYN_SNAPSHOT_CONTROL_DIR` turns its snapshot mode on)."""
    for name, value in control_dir_env(CONTROL_DIR).items():
        envs = _set_env(envs, name, value)
    return envs


def control_mount(container: str) -> dict[str, Any]:
    """The control directory of `container`: its own subdirectory of the pod's emptyDir."""
    return {"name": CONTROL_VOLUME, "mountPath": CONTROL_DIR, "subPath": container}


def add_gms(
    pod: dict[str, Any],
    target: dict[str, Any],
    *,
    ckpt: str,
    version: str,
    saver: ContainerOverride | None,
    settings: JobSettings,
) -> None:
    """The GMS sidecar server, the saver and the volumes they share (in place)."""
    image = add_gms_server(pod, target, settings=settings)
    base = {
        "name": GMS_SAVER,
        "image": image,
        "command": list(settings.gms_saver_command),
        "env": [
            gms_socket_env(),
            {"name": "GMS_CHECKPOINT_DIR", "value": gms_checkpoint_dir(ckpt, version)},
            {
                "name": "GMS_POD_UID",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}},
            },
        ],
        "volumeMounts": [
            gms_socket_mount(),
            {"name": CHECKPOINTS_VOLUME, "mountPath": CHECKPOINTS_DIR},
            control_mount(target["name"]),  # gms-save-complete goes to the target's
        ],
    }
    pod["containers"] = [*pod["containers"], merge_override(base, saver)]


def add_gms_server(pod: dict[str, Any], target: dict[str, Any], *, settings: JobSettings) -> str:
    """The GMS sidecar server and the volumes GMS containers share (its socket directory,
    the checkpoint PVC), with `target` joined to the socket (in place); returns the image
    the GMS containers run. Shared by capture Jobs (saver) and restore pods (loader)."""
    image = settings.gms_image or target.get("image", "")
    pod["volumes"] = [
        *(pod.get("volumes") or []),
        {"name": GMS_SOCKET_VOLUME, "emptyDir": {}},
        {
            "name": CHECKPOINTS_VOLUME,
            "persistentVolumeClaim": {"claimName": settings.checkpoint_claim},
        },
    ]
    target["env"] = _set_env(target.get("env") or [], "GMS_SOCKET_DIR", GMS_SOCKET_DIR)
    target["volumeMounts"] = [*(target.get("volumeMounts") or []), gms_socket_mount()]
    server = {
        "name": GMS_SERVER,
        "image": image,
        "command": list(settings.gms_server_command),
        "restartPolicy": "Always",  # a native sidecar: starts first, lives with the pod
        "env": [gms_socket_env()],
        "volumeMounts": [gms_socket_mount()],
        "startupProbe": {
            "exec": {"command": ["sh", "-c", f"ls {GMS_SOCKET_DIR}/gms_*.sock"]},
            "periodSeconds": 1,
            "failureThreshold": 600,
        },
    }
    pod["initContainers"] = [*(pod.get("initContainers") or []), server]
    return image


def gms_socket_env() -> dict[str, Any]:
    return {"name": "GMS_SOCKET_DIR", "value": GMS_SOCKET_DIR}


def gms_socket_mount() -> dict[str, Any]:
    return {"name": GMS_SOCKET_VOLUME, "mountPath": GMS_SOCKET_DIR}


def gms_checkpoint_dir(ckpt: str, version: str) -> str:
    return f"{CHECKPOINTS_DIR}/gms/{ckpt}/versions/{version}"


def merge_override(base: dict[str, Any], override: ContainerOverride | None) -> dict[str, Any]:
    """`base` with a GMS container override applied: image and command replace (the command
    is the whole argv: no args are kept), envs (whole EnvVars: `value` or `valueFrom` as
    given) merge by name with the override winning except the operator's own, base order
    kept and new names appended; a non-empty envFromSecret and the volumeMounts are
    appended; the name stays."""
    merged = copy.deepcopy(base)
    if override is None:
        return merged
    if override.image:
        merged["image"] = override.image
    if override.command:
        merged["command"] = list(override.command)
        merged.pop("args", None)
    for env in override.envs:
        if env.name not in _OPERATOR_ENVS:
            entry = env.model_dump(by_alias=True, exclude_none=True)
            merged["env"] = _put_env(merged.get("env") or [], entry)
    if override.env_from_secret:
        source = {"secretRef": {"name": override.env_from_secret}}
        merged["envFrom"] = [*(merged.get("envFrom") or []), source]
    for mount in override.volume_mounts:
        entry = mount.model_dump(by_alias=True, exclude_defaults=True)
        entry.update(name=mount.name, mountPath=mount.mount_path)
        merged["volumeMounts"] = [*(merged.get("volumeMounts") or []), entry]
    merged["name"] = base["name"]
    return merged


def use_gms_load_format(container: dict[str, Any]) -> None:
    """vLLM loads weights from GMS: `--load-format gms`, unless its arguments choose one."""
    argv = [*(container.get("command") or []), *(container.get("args") or [])]
    if any(a == "--load-format" or a.startswith("--load-format=") for a in argv):
        return
    container["args"] = [*(container.get("args") or []), "--load-format", "gms"]


def _set_env(envs: list[dict[str, Any]], name: str, value: str) -> list[dict[str, Any]]:
    """`envs` with `name` set to `value`: in place of an existing entry, else appended."""
    return _put_env(envs, {"name": name, "value": value})


def _put_env(envs: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """`envs` with the EnvVar `entry` in place of the entry of its name, else appended."""
    name = entry["name"]
    if any(e.get("name") == name for e in envs):
        return [entry if e.get("name") == name else e for e in envs]
    return [*envs, entry]
