"""The custom resources of group `warmstart.dev`, version `v1alpha1`: Checkpoint and
PodSnapshot, their validation, and the names the cluster code keys on.

Field names are the resources' own (camelCase); Python code uses snake_case attributes
with those aliases. The CRDs in `deploy/crds/` are generated from these models
(`api.crds`), and the rules a CRD carries as CEL (`x-kubernetes-validations`) are also
checked here, in Python, with the same messages: the watcher and the webhook refuse what
an API server without CEL (or an object written before a rule existed) lets through.
"""

from __future__ import annotations

import re
import zoneinfo
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from api.identity import CheckpointIdentity, checkpoint_id, pod_checkpoint_id
from api.naming import require_path_element
from api.reasons import Phase

GROUP = "warmstart.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Keys (docs/architecture.md, "Keys").
CHECKPOINT_ID_LABEL = f"{GROUP}/checkpoint-id"
CHECKPOINT_LABEL = f"{GROUP}/checkpoint"
CLEANUP_FINALIZER = f"{GROUP}/cleanup"
# On the capture Job's pod: which resource (by UID) and which container the watcher reports on.
CHECKPOINT_UID_LABEL = f"{GROUP}/checkpoint-uid"
TARGET_CONTAINER_ANNOTATION = f"{GROUP}/target-container"
# On the capture Job and its pod: the capture workflow that made them, whose signals the
# watcher sends there (a resource's later runs have IDs of their own, decision 0043).
CAPTURE_WORKFLOW_ANNOTATION = f"{GROUP}/capture-workflow"
# On a Checkpoint or PodSnapshot: set it (to any new value) to capture again now. Not under
# `warmstart.dev/`: the watcher's kopf keeps its own records there and leaves that prefix
# out of what it compares, so a change of it would go unseen (decision 0043).
CAPTURE_NOW_ANNOTATION = f"capture.{GROUP}/now"

# The exact messages of the GMS rules (also the CEL rules' messages).
LOADER_ON_CHECKPOINT = (
    "spec.gpuMemoryService.checkpoint.loader is not valid on a Checkpoint "
    "(capture Jobs only save; set checkpoint.loader on the pod that restores)"
)
SAVER_WITHOUT_GMS = "spec.gpuMemoryService.checkpoint.saver requires gpuMemoryService.enabled=true"
IDENTITY_IMMUTABLE = "spec.identity is immutable: create a new resource for another identity"
# On a verified capture's verification pod (decision 0045): a restore target the controller
# shaped itself, which the webhook leaves as it is; its node checks it against the
# Checkpoint's `status.verifying` (its UID), like any restore target's claims.
VERIFICATION_LABEL = f"{GROUP}/verification"
# An override's env (Kubernetes' EnvVar): Kubernetes' own rules, with its words.
ENV_VALUE_AND_SOURCE = "valueFrom may not be specified when `value` is not empty"
ENV_ONE_SOURCE = (
    "valueFrom must specify exactly one of `fieldRef`, `resourceFieldRef`, "
    "`configMapKeyRef` or `secretKeyRef`"
)
# Secret and ConfigMap keys; a resource.Quantity (the pattern controller-gen gives it).
_KEY = r"^[-._a-zA-Z0-9]+$"
_QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?"
    r"(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _cel(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


def _list_map(*keys: str) -> dict[str, Any]:
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


class Spec(BaseModel):
    """Base of the resources' parts: camelCase names, unknown fields ignored (the API server
    prunes them), frozen."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, frozen=True, extra="ignore"
    )


class SecretKeySelector(Spec):
    """A key of a Secret in the pod's namespace."""

    name: str = Field(min_length=1, description="Name of the Secret.")
    key: str = Field(min_length=1, pattern=_KEY, description="The key to select.")
    optional: bool | None = Field(
        default=None, description="Whether the Secret or its key may be missing."
    )


class ConfigMapKeySelector(Spec):
    """A key of a ConfigMap in the pod's namespace."""

    name: str = Field(min_length=1, description="Name of the ConfigMap.")
    key: str = Field(min_length=1, pattern=_KEY, description="The key to select.")
    optional: bool | None = Field(
        default=None, description="Whether the ConfigMap or its key may be missing."
    )


class ObjectFieldSelector(Spec):
    """A field of the pod (downward API)."""

    field_path: str = Field(min_length=1, description="Path of the field, e.g. metadata.uid.")
    api_version: str | None = Field(
        default=None, description='Version of the schema the path is written in ("v1").'
    )


class ResourceFieldSelector(Spec):
    """A resource limit or request of a container (downward API)."""

    resource: str = Field(min_length=1, description="e.g. limits.cpu, requests.memory.")
    container_name: str | None = Field(
        default=None, description="The container; the one the variable is set in by default."
    )
    divisor: str | None = Field(
        default=None,
        pattern=_QUANTITY,
        description='Output format of the resource: a quantity as a string, e.g. "1Mi".',
    )

    @field_validator("divisor", mode="before")
    @classmethod
    def _quantity_as_text(cls, value: Any) -> Any:
        # Kubernetes takes a number too; the CRD's field is a string, but a JSON number in
        # an annotation is read as its text.
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        return str(value) if is_number else value


class EnvVarSource(Spec):
    """Where a variable's value comes from: exactly one of the four sources."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    secret_key_ref: SecretKeySelector | None = None
    config_map_key_ref: ConfigMapKeySelector | None = None
    field_ref: ObjectFieldSelector | None = None
    resource_field_ref: ResourceFieldSelector | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EnvVarSource:
        sources = (self.secret_key_ref, self.config_map_key_ref, self.field_ref)
        if sum(s is not None for s in (*sources, self.resource_field_ref)) != 1:
            raise ValueError(ENV_ONE_SOURCE)
        return self


class EnvVar(Spec):
    """An environment variable, as Kubernetes' EnvVar: a literal `value`, or `valueFrom` a
    Secret or ConfigMap key, a pod field or a container resource."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            "!has(self.valueFrom) || !has(self.value) || size(self.value) == 0",
            ENV_VALUE_AND_SOURCE,
        )
    )

    name: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    value: str | None = Field(default=None, description="A literal value.")
    value_from: EnvVarSource | None = Field(
        default=None, description="A source for the value; not with a non-empty value."
    )

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value and self.value_from is not None:
            raise ValueError(ENV_VALUE_AND_SOURCE)
        return self


class VolumeMount(Spec):
    """A volume of the pod mounted into the container."""

    name: str = Field(min_length=1, description="Name of a volume of the pod.")
    mount_path: str = Field(min_length=1, pattern=r"^/", description="Absolute mount path.")
    sub_path: str = ""
    read_only: bool = False


class ContainerOverride(Spec):
    """Changes to a GMS container: image and command replace the defaults (the command is
    the whole argv); envs (Kubernetes EnvVars: a value or a valueFrom, passed on as given)
    merge by name with these winning (except GMS_SOCKET_DIR, which the operator owns);
    envFromSecret and volumeMounts are appended."""

    image: str | None = Field(default=None, min_length=1)
    command: list[str] | None = Field(default=None, min_length=1)
    envs: list[EnvVar] = Field(default_factory=list, json_schema_extra=_list_map("name"))
    env_from_secret: str = Field(default="", description="Secret whose keys become envs.")
    volume_mounts: list[VolumeMount] = Field(
        default_factory=list, json_schema_extra=_list_map("mountPath")
    )

    @field_validator("envs")
    @classmethod
    def _unique_names(cls, envs: list[EnvVar]) -> list[EnvVar]:
        names = [env.name for env in envs]
        if len(names) != len(set(names)):
            raise ValueError(f"env names must be unique, got {names}")
        return envs


class GmsCheckpoint(Spec):
    """GMS containers of the capture: the saver. (`loader` exists in the schema only so that
    a Checkpoint carrying it is refused with a message saying where it belongs.)"""

    saver: ContainerOverride | None = None
    loader: ContainerOverride | None = None


class GpuMemoryService(Spec):
    """The GPU Memory Service: GPU memory saved and loaded by sidecars outside the workload."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.checkpoint) || !has(self.checkpoint.saver) "
                    "|| (has(self.enabled) && self.enabled)",
                    "message": SAVER_WITHOUT_GMS,
                }
            ]
        }
    )

    enabled: bool = Field(default=False, description="Run the GMS sidecars.")
    mode: Literal["intraPod", "interPod"] = Field(
        default="intraPod", description="GMS in the workload's pod, or shared between pods."
    )
    checkpoint: GmsCheckpoint | None = None

    @model_validator(mode="after")
    def _saver_needs_gms(self) -> GpuMemoryService:
        if self.checkpoint is not None and self.checkpoint.saver is not None and not self.enabled:
            raise ValueError(SAVER_WITHOUT_GMS)
        return self


class JobTemplate(Spec):
    """The capture Job: the workload's pod template and which container to checkpoint."""

    pod_template_spec: dict[str, Any] = Field(
        description="A PodTemplateSpec (metadata, spec) of the workload to warm up and dump.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    target_container_name: str = Field(
        default="main", min_length=1, description="The container of the template to dump."
    )
    active_deadline_seconds: int = Field(
        default=3600, ge=60, le=86400, description="The Job's deadline, warm-up included."
    )

    @model_validator(mode="after")
    def _target_in_template(self) -> JobTemplate:
        containers = (self.pod_template_spec.get("spec") or {}).get("containers") or []
        names = [c.get("name") for c in containers if isinstance(c, dict)]
        if self.target_container_name not in names:
            raise ValueError(
                f"targetContainerName {self.target_container_name!r} is not a container of "
                f"podTemplateSpec (containers: {names})"
            )
        return self


class PvcStorage(Spec):
    """A ReadWriteMany PVC mounted at /checkpoints on every node."""

    claim_name: str = Field(min_length=1)
    sub_path: str = ""


class S3Storage(Spec):
    """An S3-compatible bucket."""

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_./-]*$")
    endpoint: str = ""
    region: str = ""
    credentials_secret: str = Field(
        default="",
        description="Secret in this namespace with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY "
        "(and optionally AWS_SESSION_TOKEN); empty: the workers' own credentials.",
    )
    server_side_encryption: Literal["", "AES256", "aws:kms"] = Field(
        default="", description="SSE-S3 (AES256) or SSE-KMS (aws:kms); empty: the bucket's."
    )
    kms_key_id: str = Field(default="", alias="kmsKeyID", description="The SSE-KMS key.")


class Storage(Spec):
    """Where checkpoints go: a PVC mounted on every node, or S3 (default from settings)."""

    type: Literal["pvc", "s3"]
    pvc: PvcStorage | None = None
    s3: S3Storage | None = None

    @model_validator(mode="after")
    def _one_backend(self) -> Storage:
        if getattr(self, self.type) is None:
            raise ValueError(f"storage type {self.type!r} needs storage.{self.type}")
        return self


class Prefetch(Spec):
    """Nodes whose caches are warmed with each version once it is Ready (remote storage)."""

    node_selectors: list[Annotated[dict[str, str], Field(min_length=1, max_length=16)]] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Label maps; a node whose labels include all of one map is warmed. Each map "
            "names at least one label: an empty one would select every node of the cluster."
        ),
    )
    nodes_at_once: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description=(
            "How many nodes fetch at once, a cap on the bucket's concurrent reads of the "
            "version (0: all at once)."
        ),
    )


_CRON_MACROS = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)
_CRON_NAMES = {
    "month": ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"],
    "day of week": ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"],
}
# (name, lowest, highest) of the five fields of a cron expression.
_CRON_FIELDS = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)
_CRON_ITEM = re.compile(r"^(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/([0-9]+))?$")


def _cron_value(token: str, field: str, low: int, high: int) -> int:
    names = _CRON_NAMES.get(field, [])
    if token.upper() in names:
        return names.index(token.upper()) + (1 if field == "month" else 0)
    if not token.isdigit() or not low <= int(token) <= high:
        raise ValueError(f"cron {field} {token!r} is not in {low}-{high}")
    return int(token)


def check_cron(expression: str) -> str:
    """A standard five-field cron expression (minute hour day-of-month month day-of-week:
    numbers, names of months and weekdays, `*`, ranges, lists and steps) or a macro such
    as `@daily`; the Temporal Schedule reads it. Anything else is refused by name."""
    text = expression.strip()
    if text.startswith("@"):
        if text not in _CRON_MACROS:
            raise ValueError(f"cron macro {text!r} is not one of {sorted(_CRON_MACROS)}")
        return text
    fields = text.split()
    if len(fields) != len(_CRON_FIELDS):
        raise ValueError(
            f"cron {expression!r} has {len(fields)} fields; it needs 5: "
            "minute hour day-of-month month day-of-week"
        )
    for value, (field, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        for item in value.split(","):
            match = _CRON_ITEM.match(item)
            if match is None:
                raise ValueError(f"cron {field} {item!r} is not *, N, N-M or one with /STEP")
            if match.group(4) is not None and int(match.group(4)) == 0:
                raise ValueError(f"cron {field} {item!r} has a step of 0")
            if match.group(1) != "*":
                ends = [_cron_value(t, field, low, high) for t in match.group(1).split("-")]
                if ends != sorted(ends):
                    raise ValueError(f"cron {field} range {item!r} runs backwards")
    return " ".join(fields)


class CaptureSchedule(Spec):
    """Capture the Checkpoint again on a schedule (a Temporal Schedule of its own); each
    run is a new version of the same checkpoint ID, published when it is Ready."""

    cron: str = Field(
        description=(
            "When: five fields (minute hour day-of-month month day-of-week) or a macro "
            "such as @daily."
        ),
        min_length=1,
        max_length=128,
    )
    time_zone: str = Field(default="UTC", description="The IANA time zone the cron is read in.")
    paused: bool = Field(default=False, description="Paused: no run starts until unpaused.")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return check_cron(value)

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            raise ValueError(f"timeZone {value!r} is not an IANA time zone") from None
        return value


class ResourceIdentity(CheckpointIdentity):
    """What makes two checkpoints interchangeable; its hash is the checkpoint ID. On a
    resource the parallel sizes are at least 1 (the hash, like Dynamo's, reads 0 as 1)."""

    tensor_parallel_size: int = Field(
        default=1, ge=1, alias="tensorParallelSize", description="GPUs per pipeline stage."
    )
    pipeline_parallel_size: int = Field(
        default=1, ge=1, alias="pipelineParallelSize", description="Pipeline stages."
    )


class CheckpointSpec(Spec):
    """What to checkpoint and how to run it for the capture."""

    identity: ResourceIdentity = Field(
        description="What makes two checkpoints interchangeable; its hash is the checkpoint "
        "ID. Immutable.",
        json_schema_extra=_cel("self == oldSelf", IDENTITY_IMMUTABLE),
    )
    job: JobTemplate
    gpu_memory_service: GpuMemoryService = Field(
        default_factory=GpuMemoryService,
        json_schema_extra=_cel(
            "!has(self.checkpoint) || !has(self.checkpoint.loader)", LOADER_ON_CHECKPOINT
        ),
    )
    storage: Storage | None = None
    prefetch: Prefetch | None = None
    schedule: CaptureSchedule | None = Field(
        default=None, description="Capture again on a schedule (decision 0043)."
    )
    verify: bool = Field(
        default=False,
        description=(
            "Restore each new version once on the capturing node, in a verification pod "
            "shaped from the template, before it is Ready (a verified checkpoint, decision "
            "0045): a version whose pod does not restore and become Ready is Failed "
            "(VerifyFailed) and deleted."
        ),
    )
    verify_timeout_seconds: int = Field(
        default=120,
        ge=1,
        le=3600,
        description="With verify: how long the restored verification pod may take to be Ready.",
    )

    @model_validator(mode="after")
    def _no_loader(self) -> CheckpointSpec:
        gms = self.gpu_memory_service.checkpoint
        if gms is not None and gms.loader is not None:
            raise ValueError(LOADER_ON_CHECKPOINT)
        return self


class PodRef(Spec):
    """The running pod and its one container to checkpoint."""

    name: str = Field(min_length=1)
    uid: str = Field(min_length=1, description="The pod's UID: a pod re-created is refused.")
    containers: list[str] = Field(min_length=1, max_length=1, description="The one container.")


class PodSource(Spec):
    """The source of a PodSnapshot."""

    pod_ref: PodRef


class PodSnapshotSpec(Spec):
    """Which running container to checkpoint."""

    source: PodSource
    identity: ResourceIdentity | None = Field(
        default=None,
        description="Optional; without it the ID is the hash of the pod UID and container.",
        json_schema_extra=_cel("self == oldSelf", IDENTITY_IMMUTABLE),
    )
    gpu_memory_service: GpuMemoryService = Field(default_factory=GpuMemoryService)
    storage: Storage | None = None


class Condition(Spec):
    """A metav1.Condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: datetime
    observed_generation: int = 0


class WorkflowLink(Spec):
    """The capture's Temporal workflow."""

    id: str
    run_id: str = Field(default="", alias="runID")
    url: str = ""


class QuarantineStatus(Spec):
    """A quarantine in effect (`api.quarantine.QuarantineEntry`), as the status shows it."""

    version: str = Field(
        default="", description="The version refused; empty: every version of the checkpoint."
    )
    node_class: str = Field(description="GPU model, GPU driver and CRIU version refused.")
    nodes: list[str] = Field(
        default_factory=list, description="The nodes whose restores of it failed there."
    )
    reason: str = Field(default="", description="The reason of the latest failure.")
    message: str = Field(default="", description="Its message (the first 512 characters).")
    since: datetime = Field(description="When it took effect.")
    expires: datetime | None = Field(
        default=None, description="When it lapses, unless restores there fail again."
    )


class VerifyingStatus(Spec):
    """A verified capture's version while its verification pod restores it: that one pod
    (by UID) may restore that version, held back, before the resource is Ready with it."""

    version: str = Field(description="The version being verified.")
    manifest_sha256: str = Field(
        default="", alias="manifestSHA256", description="SHA-256 of its committed manifest."
    )
    pod_name: str = Field(default="", description="The verification pod.")
    pod_uid: str = Field(
        default="", alias="podUID", description="Its UID: no other pod restores the version."
    )


class CaptureStatus(Spec):
    """What a capture reached, written by the control worker only; and the quarantines of
    its checkpoint in effect (published by the control side from the store's records)."""

    phase: Phase = Field(
        default=Phase.PENDING,
        description="Pending, Creating, Capturing, Uploading, Ready or Failed (Failed stays).",
    )
    message: str = Field(default="", description="Why the capture failed, when it did.")
    conditions: list[Condition] = Field(default_factory=list, json_schema_extra=_list_map("type"))
    checkpoint_id: str = Field(
        default="", alias="checkpointID", description="The 16-hex checkpoint ID."
    )
    node_name: str = Field(default="", description="The node the workload was dumped on.")
    job_name: str = Field(default="", description="The capture Job (Checkpoint only).")
    version: str = Field(default="", description="The committed version.")
    size_bytes: int = Field(default=0, description="Bytes of the committed version.")
    storage_uri: str = Field(default="", alias="storageURI", description="Where it is stored.")
    manifest_sha256: str = Field(
        default="",
        alias="manifestSHA256",
        description=(
            "SHA-256 of the committed version's manifest, which names every file's digest: "
            "nodes restore only the version with this very manifest, wherever it is stored."
        ),
    )
    step_seconds: dict[str, float] = Field(
        default_factory=dict, description="Seconds each capture step took."
    )
    workflow: WorkflowLink | None = Field(
        default=None, description="The Temporal workflow: ID, run ID, Web UI link."
    )
    observed_generation: int = 0
    verifying: VerifyingStatus | None = Field(
        default=None,
        description="While a verified capture's verification pod restores its new version.",
    )
    quarantine: list[QuarantineStatus] = Field(
        default_factory=list,
        description=(
            "Versions of this checkpoint quarantined on a node class: pods of that class "
            "start cold at once (`warmstart quarantine list|clear`)."
        ),
    )


class ObjectMeta(Spec):
    """The part of metav1.ObjectMeta warmstart reads."""

    model_config = ConfigDict(extra="allow")

    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    resource_version: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    finalizers: list[str] = Field(default_factory=list)
    deletion_timestamp: datetime | None = None

    @field_validator("name", "namespace")
    @classmethod
    def _path_safe(cls, value: str) -> str:
        return require_path_element(value, what="metadata name or namespace")


class Checkpoint(Spec):
    """Make a checkpoint of a workload: a Job runs it on a GPU node, warmstart dumps it once
    it is ready and publishes the checkpoint ID."""

    api_version: Literal["warmstart.dev/v1alpha1"] = "warmstart.dev/v1alpha1"
    kind: Literal["Checkpoint"] = "Checkpoint"
    metadata: ObjectMeta
    spec: CheckpointSpec
    status: CaptureStatus | None = None

    @property
    def checkpoint_id(self) -> str:
        return checkpoint_id(self.spec.identity)


class PodSnapshot(Spec):
    """Checkpoint a running pod's container; the pod keeps serving."""

    api_version: Literal["warmstart.dev/v1alpha1"] = "warmstart.dev/v1alpha1"
    kind: Literal["PodSnapshot"] = "PodSnapshot"
    metadata: ObjectMeta
    spec: PodSnapshotSpec
    status: CaptureStatus | None = None

    @property
    def checkpoint_id(self) -> str:
        if self.spec.identity is not None:
            return checkpoint_id(self.spec.identity)
        ref = self.spec.source.pod_ref
        return pod_checkpoint_id(pod_uid=ref.uid, container=ref.containers[0])


def identity_unchanged(old: CheckpointIdentity | None, new: CheckpointIdentity | None) -> None:
    """The transition rule of `spec.identity` (CEL `self == oldSelf`) in Python."""
    if old is not None and old != new:
        raise ValueError(IDENTITY_IMMUTABLE)
