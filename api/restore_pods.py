"""Shaping a pod that asks to be restored (`warmstart.dev/restore-from: <Checkpoint>`) into
a restore target: pure functions from the pod and its Checkpoint to the pod to admit
(plain dicts, as the Kubernetes API takes them). The admission webhook calls them.

A pod whose Checkpoint is Ready gets:
- the labels `warmstart.dev/restore-target: "true"` and `warmstart.dev/checkpoint-id`
  (node workers watch the first), the annotation `warmstart.dev/checkpoint-version`:
  claims a node checks against its own read of the Checkpoint, never trusts
  (`api.restore_claims`); where the version is stored is not written on the pod;
- in its main container (the Checkpoint's `targetContainerName`, else the first): the
  control directory (`SNAPSHOT_CONTROL_DIR`), the downward-API pod info at `/etc/podinfo`,
  a startup probe that waits out the restore, and a standby, of one of two kinds
  (docs/decisions/0018):
  - warmstart's: `STANDBY_SCRIPT` runs in place of the container's command and waits for
    the node's `restore-complete` (then lives as long as the restored process) or
    `restore-failed` (then starts the original command cold);
  - the image's own: a container whose spec declares `SNAPSHOT_RESTORE_STANDBY` runs
    Dynamo's restore standby in its entrypoint; its command stays, and Dynamo's variables
    are read from annotations the node turns off on a failed restore before it restarts
    the container cold;
- the io_uring-blocking seccomp profile on the pod (as capture Jobs have it);
- with the GPU Memory Service, intra-pod mode: the `gms-server` sidecar (as for capture)
  and a `gms-loader` container that loads the checkpoint's GPU memory and writes
  `gms-load-complete-<podUID>` into the main container's control directory; the pod's
  `warmstart.dev/gms-loader` annotation overrides it by the saver's merge rules. Inter-pod
  mode: GMS runs outside the pod, so no loader here; the main container gets
  `GMS_LOAD_COMPLETE_FILE`, the shared completion sentinel the node waits for.

A pod whose Checkpoint is missing or not Ready, or whose main container has no `command`
and no standby of its own (warmstart's must know what to start cold), is admitted
unchanged but for the annotation `warmstart.dev/restore-status: cold: <why>`: it starts
cold. What cannot be admitted
(another namespace's Checkpoint, a malformed loader override) raises InvalidSpecError
naming the field.

A verified capture's verification pod (`verification_pod`, decision 0045) is the same
shaping of the Checkpoint's own pod template, for the version it verifies, made by the
controller; the webhook leaves a pod labelled `warmstart.dev/verification` as it is (its
node checks its claims against the Checkpoint like any target's).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from api.dynamo import CONTROL_DIR_ENV, RESTORE_STANDBY_ENV
from api.errors import InvalidSpecError
from api.jobs import (
    CHECKPOINTS_DIR,
    CHECKPOINTS_VOLUME,
    CONTROL_DIR,
    CONTROL_VOLUME,
    SECCOMP_PROFILE,
    JobSettings,
    add_gms_server,
    control_mount,
    gms_checkpoint_dir,
    gms_socket_env,
    gms_socket_mount,
    merge_override,
    with_control_dir_env,
)
from api.reasons import Sentinel
from api.resources import (
    API_VERSION,
    CAPTURE_WORKFLOW_ANNOTATION,
    CHECKPOINT_ID_LABEL,
    CHECKPOINT_LABEL,
    GROUP,
    TARGET_CONTAINER_ANNOTATION,
    VERIFICATION_LABEL,
    Checkpoint,
    ContainerOverride,
)
from api.restore_claims import (
    CHECKPOINT_VERSION_ANNOTATION,
    RESTORE_FROM_ANNOTATION,
    RestoreClaims,
    ready_checkpoint,
    restore_claims,
    restore_source,
    validation_message,
)

GMS_LOADER_ANNOTATION = f"{GROUP}/gms-loader"
RESTORE_STATUS_ANNOTATION = f"{GROUP}/restore-status"
RESTORE_TARGET_LABEL = f"{GROUP}/restore-target"
GMS_LOADER = "gms-loader"
PODINFO_VOLUME, PODINFO_DIR = "podinfo", "/etc/podinfo"
# Marks the standby container for the node: `1` warmstart's standby script wraps its command,
# `image` its image's entrypoint is Dynamo's restore standby (IMAGE_STANDBY).
STANDBY_ENV = "WARMSTART_RESTORE_STANDBY"
OUR_STANDBY, IMAGE_STANDBY = "1", "image"
# Set on standbys whose script writes `standby-waiting` as it starts waiting (those shaped by
# this version on): their node prepares the restore as soon as the pod is scheduled and
# restores once the file is written, without waiting for the kubelet's status.
ANNOUNCE_ENV = "WARMSTART_STANDBY_ANNOUNCES"
# An image's own standby is switched by annotations its environment is read from (the
# kubelet resolves them at each container start): on a failed restore the node turns both
# off and stops the standby, and the restarted container starts cold.
STANDBY_ANNOTATION = f"{GROUP}/standby"
CONTROL_DIR_ANNOTATION = f"{GROUP}/control-dir"
# Inter-pod GMS: the loader outside the pod writes this once the memory is loaded.
GMS_LOAD_COMPLETE_FILE = f"{CONTROL_DIR}/gms-load-complete"
# The startup probe of a restore target: every second, for up to 30 minutes (a cold start
# after a failed restore included).
STARTUP_PERIOD_SECONDS, STARTUP_FAILURE_THRESHOLD = 1, 1800

_COMPLETE, _FAILED = Sentinel.RESTORE_COMPLETE.value, Sentinel.RESTORE_FAILED.value
_WAITING = Sentinel.STANDBY_WAITING.value

STANDBY_NAME = "warmstart-standby"  # the script's $0
# The standby's own deadline: past it, with neither sentinel written (no node worker acted,
# or one died mid-restore), it starts cold by itself. Longer than the node's restore
# deadline (`WARMSTART_NODE__RESTORE_DEADLINE_SECONDS`, 1800 s by default), which decides
# first whenever a node acts.
STANDBY_DEADLINE_ENV = "WARMSTART_STANDBY_DEADLINE_SECONDS"
STANDBY_DEADLINE_SECONDS = 2100
# The standby entrypoint: `/bin/sh -c STANDBY_SCRIPT warmstart-standby CMD ARGS...`. POSIX sh
# with builtins and `sleep` only (any image with /bin/sh). Restarted after a restore, it starts
# cold, without Dynamo's snapshot variables (a Dynamo worker would otherwise wait for a
# snapshot that never comes); it writes `standby-waiting` (the node may restore into it from
# then on) and waits for `restore-failed` (start CMD cold) or
# `restore-complete`, whose content is the restored process's PID in this container's PID
# namespace, or its own deadline (then it starts cold). Before a cold start it kills its
# children (a tree a restore left half-done when its node worker died), so the cold start
# never runs beside one. The standby is PID 1, so the restored process is its child: it lives
# while that process lives (forwarding SIGTERM and SIGINT to it) and exits with its status,
# read from the zombie's /proc/PID/stat (field 52, exit_code), or 1 where that cannot be read
# (a shell reaps children it does not know while it waits for `sleep`, and then the status is
# gone). No `$$` and no `$(NAME)`: Kubernetes expands those in a container's command.
STANDBY_SCRIPT = f"""\
d="${{SNAPSHOT_CONTROL_DIR:-{CONTROL_DIR}}}"
trap 'exit 143' TERM
trap 'exit 130' INT
reap() {{
  read -r me rest < /proc/self/stat || return 0
  for f in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null < "$f" || continue
    set -f
    set -- ${{line##*) }}
    set +f
    if [ "$2" = "$me" ]; then p="${{f#/proc/}}"; kill -KILL "${{p%/stat}}" 2>/dev/null; fi
  done
}}
cold() {{ reap; unset {CONTROL_DIR_ENV} {RESTORE_STANDBY_ENV}; exec "$@"; }}
limit="${{{STANDBY_DEADLINE_ENV}:-{STANDBY_DEADLINE_SECONDS}}}"
case "$limit" in ""|*[!0-9]*) limit={STANDBY_DEADLINE_SECONDS} ;; esac
ticks=0
if [ -e "$d/{_COMPLETE}" ]; then cold "$@"; fi
: > "$d/{_WAITING}"
while :; do
  if [ -e "$d/{_FAILED}" ]; then cold "$@"; fi
  if [ -e "$d/{_COMPLETE}" ]; then break; fi
  ticks=$(( ticks + 1 ))
  if [ "$ticks" -gt "$(( limit * 20 ))" ]; then
    echo "{STANDBY_NAME}: no restore within $limit s; starting cold" >&2
    cold "$@"
  fi
  sleep 0.05
done
pid=
read -r pid < "$d/{_COMPLETE}" || :
case "$pid" in ""|*[!0-9]*) exit 1 ;; esac
trap 'kill -TERM "$pid" 2>/dev/null' TERM
trap 'kill -INT "$pid" 2>/dev/null' INT
while :; do
  stat=
  read -r stat 2>/dev/null < "/proc/$pid/stat" || exit 1
  rest="${{stat##*) }}"
  if [ "${{rest%% *}}" = Z ]; then break; fi
  sleep 1
done
set -f
set -- $rest
if [ "$#" -lt 50 ]; then exit 1; fi
shift 49
case "$1" in ""|*[!0-9]*) exit 1 ;; esac
if [ "$(( $1 & 127 ))" -ne 0 ]; then exit "$(( 128 + ($1 & 127) ))"; fi
exit "$(( ($1 >> 8) & 255 ))"
"""
# The startup probe of a container without probes of its own: restored, or fallen back cold
# (a cold start must pass it too, or the kubelet would kill it after the threshold).
STARTUP_TEST = (
    f'test -e "$SNAPSHOT_CONTROL_DIR/{_COMPLETE}" || test -e "$SNAPSHOT_CONTROL_DIR/{_FAILED}"'
)


@dataclass(frozen=True)
class RestoreSettings:
    """What the operator decides for every restore target (controller settings)."""

    jobs: JobSettings = field(default_factory=JobSettings)  # GMS image, server, checkpoint PVC
    gms_loader_command: tuple[str, ...] = (
        "python3",
        "-m",
        "gpu_memory_service.cli.snapshot.loader",
    )
    gms_load_workers: int = 8
    # Seconds a restore target's standby waits for the node before it starts cold alone.
    standby_deadline_seconds: int = STANDBY_DEADLINE_SECONDS
    # The labels of the nodes that run a node worker (the DaemonSet's nodeSelector): a
    # restore target is only scheduled there, so no pod waits on a node that never acts.
    node_labels: tuple[tuple[str, str], ...] = (("nvidia.com/gpu.present", "true"),)


def loader_override(pod: Mapping[str, Any]) -> ContainerOverride | None:
    """The pod's `warmstart.dev/gms-loader` annotation as an override, None without one;
    InvalidSpecError naming the annotation when it is not JSON or not a valid override."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(GMS_LOADER_ANNOTATION)
    if raw is None:
        return None
    where = f"metadata.annotations[{GMS_LOADER_ANNOTATION}]"
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise InvalidSpecError(f"{where}: not JSON: {err}") from None
    if not isinstance(data, dict):
        raise InvalidSpecError(f"{where}: expected a JSON object, got {type(data).__name__}")
    known = {f.alias or name for name, f in ContainerOverride.model_fields.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidSpecError(
            f"{where}: unknown fields {unknown} (known: {', '.join(sorted(known))})"
        )
    try:
        return ContainerOverride.model_validate(data)
    except ValidationError as err:
        raise InvalidSpecError(f"{where}: {validation_message(err)}") from None


def restore_pod(
    pod: Mapping[str, Any], *, checkpoint: Mapping[str, Any] | None, settings: RestoreSettings
) -> dict[str, Any]:
    """The pod to admit (a new dict): `pod` shaped as a restore target of `checkpoint` (the
    Checkpoint its annotation names, as read from the pod's namespace; None: not found), or
    `pod` with a `cold: <why>` status annotation. A pod that does not ask is returned as is,
    and so is a verification pod (the controller shaped it; its node checks it).
    """
    shaped = copy.deepcopy(dict(pod))
    name = restore_source(pod)
    if name is None:
        return shaped
    loader = loader_override(pod)
    labels = (pod.get("metadata") or {}).get("labels") or {}
    if labels.get(VERIFICATION_LABEL) == "true":
        return shaped
    resource = ready_checkpoint(checkpoint, name=name)
    if isinstance(resource, str):
        return cold(shaped, resource)
    return _shaped(shaped, resource, restore_claims(resource), loader=loader, settings=settings)


def _shaped(
    shaped: dict[str, Any],
    resource: Checkpoint,
    claims: RestoreClaims,
    *,
    loader: ContainerOverride | None,
    settings: RestoreSettings,
) -> dict[str, Any]:
    """`shaped` (in place) as a restore target of `claims`, the version of `resource`."""
    spec = shaped.setdefault("spec", {})
    containers = spec.get("containers") or []
    if not containers:
        return cold(shaped, "the pod has no containers")
    wanted = resource.spec.job.target_container_name
    main = next((c for c in containers if c.get("name") == wanted), containers[0])
    own_standby = image_standby(main)
    if not own_standby and not main.get("command"):
        return cold(
            shaped,
            f"container {main.get('name')} has no command for the standby to start (an image "
            f"whose entrypoint runs Dynamo's restore standby declares {RESTORE_STANDBY_ENV})",
        )

    meta = shaped.setdefault("metadata", {})
    meta["labels"] = {
        **(meta.get("labels") or {}),
        RESTORE_TARGET_LABEL: "true",
        CHECKPOINT_ID_LABEL: claims.checkpoint_id,
    }
    meta["annotations"] = {
        **(meta.get("annotations") or {}),
        CHECKPOINT_VERSION_ANNOTATION: claims.version,
    }
    volumes = [
        v
        for v in spec.get("volumes") or []
        if v.get("name") not in (CONTROL_VOLUME, PODINFO_VOLUME)
    ]
    spec["volumes"] = [*volumes, {"name": CONTROL_VOLUME, "emptyDir": {}}, podinfo_volume()]
    security = spec.setdefault("securityContext", {})
    security["seccompProfile"] = {"type": "Localhost", "localhostProfile": SECCOMP_PROFILE}
    require_node_labels(spec, settings.node_labels)
    if own_standby:
        prepare_image_standby(main)
        meta["annotations"].update({STANDBY_ANNOTATION: "1", CONTROL_DIR_ANNOTATION: CONTROL_DIR})
    else:
        prepare_standby(main, deadline_seconds=settings.standby_deadline_seconds)
    gms = resource.spec.gpu_memory_service
    if gms.enabled and gms.mode == "intraPod":
        add_gms_loader(
            spec,
            main,
            ckpt=claims.checkpoint_id,
            version=claims.version,
            loader=loader,
            settings=settings,
        )
    elif gms.enabled:
        main["env"] = _set_env(main["env"], "GMS_LOAD_COMPLETE_FILE", GMS_LOAD_COMPLETE_FILE)
    return shaped


def verification_pod_name(name: str, version: str) -> str:
    """The verification pod of version `version` of Checkpoint `name` (one per version: a
    retried create finds its own)."""
    digest = hashlib.sha256(version.encode()).hexdigest()[:10]
    return f"{name[:40].rstrip('-.')}-verify-{digest}"


def verification_pod(
    resource: Checkpoint,
    *,
    checkpoint_id: str,
    version: str,
    node: str,
    settings: RestoreSettings,
    workflow_id: str = "",
) -> dict[str, Any]:
    """A verified capture's verification pod (decision 0045): the Checkpoint's pod template
    shaped as a restore target of `version` exactly as the webhook shapes a pod that asks
    for a Ready one, labelled as a verification (the webhook then leaves it alone), owned by
    the Checkpoint (it goes with it), and required onto `node`, the capturing node that holds
    the version, by node affinity: the scheduler places it once the capture pod's devices
    are free. InvalidSpecError when the template cannot be shaped (its main container has
    neither a command nor a standby of its own)."""
    meta = resource.metadata
    template = copy.deepcopy(resource.spec.job.pod_template_spec)
    own = template.get("metadata") or {}
    name = verification_pod_name(meta.name, version)
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta.namespace,
            "labels": {
                **(own.get("labels") or {}),
                VERIFICATION_LABEL: "true",
                CHECKPOINT_LABEL: meta.name,
            },
            "annotations": {
                **(own.get("annotations") or {}),
                RESTORE_FROM_ANNOTATION: meta.name,
                TARGET_CONTAINER_ANNOTATION: resource.spec.job.target_container_name,
                **({CAPTURE_WORKFLOW_ANNOTATION: workflow_id} if workflow_id else {}),
            },
            "ownerReferences": [
                {
                    "apiVersion": API_VERSION,
                    "kind": "Checkpoint",
                    "name": meta.name,
                    "uid": meta.uid,
                    "controller": True,
                }
            ],
        },
        "spec": {**(template.get("spec") or {}), "restartPolicy": "Never"},
    }
    claims = RestoreClaims(
        checkpoint_id=checkpoint_id, version=version, storage=None, unverified=True
    )
    shaped = _shaped(pod, resource, claims, loader=None, settings=settings)
    why = (shaped["metadata"].get("annotations") or {}).get(RESTORE_STATUS_ANNOTATION)
    if why is not None:
        why = why.removeprefix("cold: ")
        raise InvalidSpecError(f"spec.job.podTemplateSpec cannot be verified: {why}")
    require_node(shaped["spec"], node)
    return shaped


def require_node(spec: dict[str, Any], node: str) -> None:
    """The pod (in place) schedulable only on the node named `node` (by its name, as a
    DaemonSet's pods are: `matchFields` on `metadata.name`), in every one of its required
    node-selector terms."""
    ours = [{"key": "metadata.name", "operator": "In", "values": [node]}]
    node_affinity = spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
    required = node_affinity.setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {"nodeSelectorTerms": []}
    )
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({"matchFields": ours})
        return
    for term in terms:
        term["matchFields"] = [*(term.get("matchFields") or []), *ours]


def cold(pod: dict[str, Any], why: str) -> dict[str, Any]:
    """`pod` (in place) with the annotation saying it starts cold and why."""
    meta = pod.setdefault("metadata", {})
    meta["annotations"] = {
        **(meta.get("annotations") or {}),
        RESTORE_STATUS_ANNOTATION: f"cold: {why}",
    }
    return pod


def require_node_labels(spec: dict[str, Any], labels: tuple[tuple[str, str], ...]) -> None:
    """The pod (in place) schedulable only on nodes carrying every one of `labels`: each of
    its own required node-selector terms (they are alternatives) gets the labels as match
    expressions (which must all hold), or one term holds them alone."""
    if not labels:
        return
    ours = [{"key": key, "operator": "In", "values": [value]} for key, value in labels]
    node_affinity = spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
    required = node_affinity.setdefault(
        "requiredDuringSchedulingIgnoredDuringExecution", {"nodeSelectorTerms": []}
    )
    terms = required.setdefault("nodeSelectorTerms", [])
    if not terms:
        terms.append({"matchExpressions": ours})
        return
    for term in terms:
        term["matchExpressions"] = [*(term.get("matchExpressions") or []), *ours]


def image_standby(container: Mapping[str, Any]) -> bool:
    """Whether the container's image runs Dynamo's restore standby itself: its spec declares
    `SNAPSHOT_RESTORE_STANDBY` (with any value; warmstart sets it)."""
    return any(e.get("name") == RESTORE_STANDBY_ENV for e in container.get("env") or [])


def prepare_standby(
    container: dict[str, Any], *, deadline_seconds: int = STANDBY_DEADLINE_SECONDS
) -> None:
    """The main container as a restore target (in place): the standby entrypoint in front of
    its command with its own deadline, the control directory, pod info and the startup
    probe."""
    argv = [*container.get("command", []), *container.get("args", [])]
    container["command"] = ["/bin/sh", "-c", STANDBY_SCRIPT, STANDBY_NAME, *argv]
    container.pop("args", None)
    env = with_control_dir_env(container.get("env") or [])
    env = _set_env(env, STANDBY_ENV, OUR_STANDBY)
    env = _set_env(env, ANNOUNCE_ENV, "1")
    container["env"] = _set_env(env, STANDBY_DEADLINE_ENV, str(deadline_seconds))
    _standby_mounts_and_probe(container)


def prepare_image_standby(container: dict[str, Any]) -> None:
    """The main container of an image that is its own restore standby (in place): command and
    args kept; Dynamo's `SNAPSHOT_RESTORE_STANDBY` and `DYN_SNAPSHOT_CONTROL_DIR` read from
    the pod's annotations (STANDBY_ANNOTATION, CONTROL_DIR_ANNOTATION), so that turning them
    off and restarting the container starts it cold; the control directory, pod info and the
    startup probe as for warmstart's standby."""
    env = [
        e
        for e in with_control_dir_env(container.get("env") or [])
        if e.get("name") not in (CONTROL_DIR_ENV, RESTORE_STANDBY_ENV)
    ]
    for name, annotation in (
        (RESTORE_STANDBY_ENV, STANDBY_ANNOTATION),
        (CONTROL_DIR_ENV, CONTROL_DIR_ANNOTATION),
    ):
        path = f"metadata.annotations['{annotation}']"
        env.append({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
    container["env"] = _set_env(env, STANDBY_ENV, IMAGE_STANDBY)
    _standby_mounts_and_probe(container)


def _standby_mounts_and_probe(container: dict[str, Any]) -> None:
    taken = (CONTROL_DIR, PODINFO_DIR)
    mounts = [m for m in container.get("volumeMounts") or [] if m.get("mountPath") not in taken]
    podinfo = {"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": True}
    container["volumeMounts"] = [*mounts, control_mount(container["name"]), podinfo]
    container["startupProbe"] = startup_probe(container)


def startup_probe(container: Mapping[str, Any]) -> dict[str, Any]:
    """A startup probe that waits out the restore: the container's own startup (else
    readiness) probe, checked every second for up to 30 minutes; without one, the
    `restore-complete` or `restore-failed` sentinel (a cold start must pass it too)."""
    own = container.get("startupProbe") or container.get("readinessProbe")
    if own:
        probe = copy.deepcopy(dict(own))
        probe.pop("successThreshold", None)  # a startup probe's must be 1
        probe.pop("initialDelaySeconds", None)  # sized for a cold start, not a restore
    else:
        probe = {"exec": {"command": ["/bin/sh", "-c", STARTUP_TEST]}}
    probe["periodSeconds"] = STARTUP_PERIOD_SECONDS
    probe["failureThreshold"] = STARTUP_FAILURE_THRESHOLD
    return probe


def podinfo_volume() -> dict[str, Any]:
    """The downward-API volume of pod facts the node and the workload read."""
    fields = {
        "pod_name": "metadata.name",
        "pod_uid": "metadata.uid",
        "pod_namespace": "metadata.namespace",
        "labels": "metadata.labels",
        "annotations": "metadata.annotations",
    }
    items = [{"path": path, "fieldRef": {"fieldPath": ref}} for path, ref in fields.items()]
    return {"name": PODINFO_VOLUME, "downwardAPI": {"items": items}}


def add_gms_loader(
    spec: dict[str, Any],
    main: dict[str, Any],
    *,
    ckpt: str,
    version: str,
    loader: ContainerOverride | None,
    settings: RestoreSettings,
) -> None:
    """Intra-pod GMS (in place): the sidecar server and the loader of the checkpoint's GPU
    memory, which reports `gms-load-complete-<podUID>` in the main container's control dir."""
    image = add_gms_server(spec, main, settings=settings.jobs)
    base = {
        "name": GMS_LOADER,
        "image": image,
        "command": list(settings.gms_loader_command),
        "env": [
            gms_socket_env(),
            {"name": "GMS_CHECKPOINT_DIR", "value": gms_checkpoint_dir(ckpt, version)},
            {"name": "GMS_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
            {"name": "GMS_LOAD_WORKERS", "value": str(settings.gms_load_workers)},
        ],
        "volumeMounts": [
            gms_socket_mount(),
            {"name": CHECKPOINTS_VOLUME, "mountPath": CHECKPOINTS_DIR, "readOnly": True},
            control_mount(main["name"]),
        ],
    }
    spec["containers"] = [*spec["containers"], merge_override(base, loader)]


def _set_env(envs: list[dict[str, Any]], name: str, value: str) -> list[dict[str, Any]]:
    """`envs` with `name` set to `value`: in place of an existing entry, else appended."""
    entry = {"name": name, "value": value}
    if any(e.get("name") == name for e in envs):
        return [entry if e.get("name") == name else e for e in envs]
    return [*envs, entry]
