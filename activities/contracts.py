"""Input and output contracts of activities: frozen models, one pair per activity.

They carry what the workflow decides and what it uses, nothing a node can derive itself:
node-local paths (control directory, output file, staging) are derived on the node from
the workload's name and checkpoint ID (`activities.host.layout`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from api.catalog import CatalogEntry
from api.contract import Contract
from api.identity import CheckpointIdentity
from api.limits import ShortSeconds
from api.manifest import Manifest
from api.quarantine import QuarantineEntry
from api.reasons import Phase, Reason, Sentinel
from api.resources import VerifyingStatus
from api.retention import CheckpointVersion, ProtectedRef
from api.storage import RemoteStorage
from api.workload import LocalWorkload

PipelineKind = Literal["capture", "restore"]
__all__ = ["RemoteStorage"]  # part of these contracts; defined beside the resources


class ResourceRef(Contract):
    """The resource a cluster capture works for (absent in local mode)."""

    kind: Literal["Checkpoint", "PodSnapshot"]
    namespace: str
    name: str
    uid: str


class ClaimInput(Contract):
    checkpoint_id: str
    namespace: str
    name: str
    resource: ResourceRef | None = None


class ContainerTarget(Contract):
    """A container of a pod on this node: the node finds it through its container runtime."""

    namespace: str
    pod_name: str
    pod_uid: str
    container: str
    # The runtime's ID of the container as the kubelet reports it (without `containerd://`),
    # when known: the node then finds it without asking the runtime.
    container_id: str = ""
    # A restore target's standby: warmstart's script ("warmstart"), or the image's own
    # Dynamo standby ("image"), which a failed restore turns off and restarts cold.
    standby: Literal["warmstart", "image"] = "warmstart"
    # Whether the standby writes `standby-waiting` as it starts waiting: then the restore may
    # start before it runs (the node prepares, then restores once the file is written).
    announces: bool = False


class StatusInput(Contract):
    """The status of a Checkpoint (cluster) or of a local capture/restore (local mode)."""

    kind: PipelineKind
    namespace: str
    name: str
    phase: Phase
    reason: Reason
    message: str = ""
    checkpoint_id: str = ""
    version: str = ""
    node: str = ""
    storage_uri: str = ""
    size_bytes: int = 0
    step_seconds: dict[str, float] = Field(default_factory=dict)
    resource: ResourceRef | None = None
    job_name: str = ""
    # A restore on a cluster: the restore-target pod (annotated and given an Event).
    pod: ContainerTarget | None = None
    # A capture that committed: the SHA-256 of its manifest, for the resource's status.
    manifest_sha256: str = ""
    # A later run of the resource's capture: a published version stays until it is Ready.
    recapture: bool = False
    # A verified capture on a cluster: the version its verification pod restores (shown on
    # the resource's status while it does; decision 0045).
    verifying: VerifyingStatus | None = None


class JobInput(Contract):
    resource: ResourceRef
    version: str


class JobRef(Contract):
    namespace: str
    name: str


class PodQuery(Contract):
    """The pod of a capture Job (by `job_name`) or a named running pod (by `pod_name` and
    `pod_uid`: a pod created again under that name is not it), and the workload's container."""

    namespace: str
    container: str
    job_name: str = ""
    pod_name: str = ""
    pod_uid: str = ""


class PodObservation(Contract):
    """What the control worker reads of a capture Job's pod (the watcher's signals carry
    the same facts). `failure` is set when the Job or a container failed."""

    pod_name: str = ""
    pod_uid: str = ""
    node_name: str = ""
    container_ready: bool = False
    failure: str = ""


class LaunchInput(Contract):
    workload: LocalWorkload
    checkpoint_id: str


class LaunchResult(Contract):
    pid: int
    start_ticks: int


class AwaitReadyInput(Contract):
    workload: LocalWorkload
    checkpoint_id: str
    pid: int


class StopInput(Contract):
    """The process to stop: `pid` (with its start time: a PID that started at another time
    is not ours and is left alone), or, without a pid, what the node's launch record of
    `name` and `checkpoint_id` says (a launch whose result the workflow never saw)."""

    pid: int = 0
    start_ticks: int = 0
    name: str = ""
    checkpoint_id: str = ""


class DumpInput(Contract):
    checkpoint_id: str
    version: str
    name: str
    pid: int
    leave_running: bool = False  # the workload keeps serving after the dump


class CommitInput(Contract):
    checkpoint_id: str
    version: str
    identity: CheckpointIdentity
    namespace: str
    name: str
    # A verified capture's: the version is committed held back (`unverified`), offered to
    # no restore and no catalog until its test restore answers (decision 0045).
    unverified: bool = False


class CommitResult(Contract):
    storage_uri: str
    size_bytes: int
    # SHA-256 of the committed manifest's bytes: it names every file's digest, so it pins
    # the whole version wherever it is stored (a Checkpoint's status records it).
    manifest_sha256: str = ""


class ReleaseInput(Contract):
    """Offer a version held back unverified: its verification pod restored it."""

    checkpoint_id: str
    version: str


class DiscardInput(Contract):
    checkpoint_id: str
    version: str
    # Also delete the version if it was committed and is still held back unverified (a
    # verified capture whose test restore failed or never finished); a verified one stays.
    unverified: bool = False


class SentinelInput(Contract):
    checkpoint_id: str
    name: str
    sentinel: Sentinel


class RestoreInput(Contract):
    checkpoint_id: str
    version: str = ""  # newest committed when empty
    name: str
    answer_timeout_seconds: ShortSeconds
    # Where the version is fetched from when this node does not hold it (into its cache).
    storage: RemoteStorage | None = None
    # The restored process's new environment, as far as it re-reads one: the names of
    # Dynamo's restore context (api.dynamo), handed over in `restore-context.json`.
    env: dict[str, str] = Field(default_factory=dict)


class VerifyInput(Contract):
    """A verified capture's test restore of the version it has just committed."""

    checkpoint_id: str
    version: str
    name: str
    answer_timeout_seconds: ShortSeconds


class VerifyResult(Contract):
    """A test restore that answered: where its time went (the restore's stages, then
    `stop-and-tidy`: the throwaway process killed and the workload's state put back)."""

    stage_seconds: dict[str, float]


class RestoredWorkload(Contract):
    """The node's answer to a restore: the running process and where the time went."""

    pid: int
    version: str
    stage_seconds: dict[str, float]
    # A lazy restore (decision 0034): the lazy-pages daemon still serving its memory, and
    # why this node restored eagerly although it asks for lazy restores ("" when it did not).
    lazy_pages_pid: int = 0
    lazy_unavailable: str = ""
    # A streamed restore (decision 0039): the page source still fetching the version's page
    # images, and why a restore this node would have streamed downloaded first instead.
    page_source_pid: int = 0
    stream_unavailable: str = ""
    # How many restores were in CRIU on this node when this one entered, itself included
    # (at most WARMSTART_CRIU__MAX_CONCURRENT_RESTORES; decision 0040).
    criu_running: int = 0


class Heartbeat(Contract):
    """What long node activities report while they run (read by `warmstart` followers);
    a transfer adds its total and its rate (bytes per second)."""

    stage: str = ""
    bytes: int | None = None
    waited_seconds: float | None = None
    bytes_total: int | None = None
    rate: float | None = None


class UploadInput(Contract):
    """Publish a version committed on this node to `storage`."""

    checkpoint_id: str
    version: str
    storage: RemoteStorage


class UploadResult(Contract):
    storage_uri: str
    size_bytes: int
    bytes_transferred: int  # what crossed the wire (a resumed upload sends only the rest)
    seconds: float


class PrefetchInput(Contract):
    """Fill this node's cache with a version (newest when empty) before pods land."""

    checkpoint_id: str
    version: str = ""
    storage: RemoteStorage


class NodeSelectorInput(Contract):
    """Label maps; a node matches when its labels include all of one of them."""

    selectors: list[dict[str, str]]


class PrefetchResult(Contract):
    version: str
    size_bytes: int
    downloaded: bool  # False: it was in the cache (or this node's store) already
    seconds: float


class VerificationPodInput(Contract):
    """The verification pod of a verified cluster capture's `version` (decision 0045), on the
    capturing `node`."""

    resource: ResourceRef
    checkpoint_id: str
    version: str
    node: str


class VerificationPod(Contract):
    namespace: str
    name: str
    uid: str


class VerificationQuery(Contract):
    """The verification pod (by name and UID: one created again is not it) and its main
    container."""

    namespace: str
    name: str
    uid: str
    container: str


class VerificationObservation(Contract):
    """What the verification pod says: its `restore-status` ("" before the node published
    one), whether its main container is Ready, and `failure` when the pod is gone, was
    created again, is being deleted, failed, or its container ended. The watcher's signals
    carry the pod's UID (a signal of another pod is not this capture's)."""

    pod_uid: str = ""
    restore_status: str = ""
    ready: bool = False
    failure: str = ""


class GmsSavedInput(Contract):
    target: ContainerTarget
    timeout_seconds: ShortSeconds


class ContainerDumpInput(Contract):
    checkpoint_id: str
    version: str
    target: ContainerTarget
    leave_running: bool = False  # a PodSnapshot: the source keeps serving


class ContainerCommitInput(Contract):
    checkpoint_id: str
    version: str
    identity: CheckpointIdentity
    target: ContainerTarget
    resource_name: str
    # A verified capture's: committed held back (`unverified`) until its verification pod
    # restores it (decision 0045).
    unverified: bool = False


class ContainerSentinelInput(Contract):
    target: ContainerTarget
    sentinel: Sentinel
    content: str = ""  # e.g. the reason of a restore-failed


class ContainerRestoreInput(Contract):
    """Restore a checkpoint into the standby container of a restore target."""

    target: ContainerTarget
    checkpoint_id: str
    version: str = ""  # newest committed when empty
    # The GMS loader's sentinel to await first ("" without GMS).
    gms_sentinel: str = ""
    gms_timeout_seconds: ShortSeconds = 600.0
    storage: RemoteStorage | None = None
    # The SHA-256 of the version's manifest as its capture committed it (its Checkpoint's
    # status): a version stored anywhere with another manifest is refused. "" : unchecked
    # (a Checkpoint captured before it was recorded).
    manifest_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    # A verification pod's restore (decision 0045): the version is held back on this node
    # (`unverified`); a failure is evidence against the version, not the node class, so no
    # quarantine evidence is recorded.
    unverified: bool = False


class RestoredContainer(Contract):
    pid: int  # on the node
    namespace_pid: int  # in the container's PID namespace (what restore-complete says)
    version: str
    stage_seconds: dict[str, float]
    # Why this node restored eagerly although it asks for lazy restores ("" otherwise).
    lazy_unavailable: str = ""


# Retention (control queue): the store's versions, what protects them, deletions, sweeps.
class ListVersionsInput(Contract):
    pass


class CheckpointVersions(Contract):
    versions: tuple[CheckpointVersion, ...]
    location: str = ""  # the S3 location listed (empty for the checkpoint root)


class ProtectedInput(Contract):
    pass


class ProtectedVersions(Contract):
    refs: tuple[ProtectedRef, ...]


class DeleteVersionInput(Contract):
    checkpoint_id: str
    version: str


class DeleteVersionResult(Contract):
    """`existed`: whether the version was still committed (False on a retry after the
    manifest went)."""

    existed: bool


class SweepInput(Contract):
    staging_older_than_seconds: float
    dry_run: bool = False


class SweepResult(Contract):
    """What was (or, on a dry run, would be) removed, as paths relative to the store root."""

    staging: tuple[str, ...] = ()
    half_deleted: tuple[str, ...] = ()
    quarantine: tuple[str, ...] = ()


class UploadSweepInput(Contract):
    older_than_seconds: float
    dry_run: bool = False


class UploadSweepResult(Contract):
    """Incomplete multipart uploads aborted (or, on a dry run, that would be), as URIs."""

    aborted: tuple[str, ...] = ()


# The catalog and the quarantine of the store the control worker mounts, for the CLI
# wherever it runs (`warmstart list`, `describe`, `quarantine` without the node's disk).
CatalogAction = Literal["list", "find", "describe", "quarantine", "clear-quarantine"]


class CatalogQuery(Contract):
    """`list` every version; `find` or `describe` (with its manifest) the newest named or
    with ID `ref`; `quarantine` entries (of `ref`, or all); `clear-quarantine` of `ref`."""

    action: CatalogAction
    ref: str = ""


class CatalogAnswer(Contract):
    entries: tuple[CatalogEntry, ...] = ()
    manifest: Manifest | None = None
    quarantine: tuple[QuarantineEntry, ...] = ()
    checkpoint_id: str = ""  # what `ref` resolved to (quarantine)
