"""What both restore paths share (local mode, `activities.local.restore`; containers,
`activities.runtime.standby`): the stage timer, the gate a restore passes before it reads
any artifact, and opening the version to restore from."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from pathlib import Path

from temporalio import activity

from activities import metrics
from activities.contracts import Heartbeat, RemoteStorage
from activities.host.files import sha256_file
from activities.storage.quarantine import (
    NodeClass,
    Quarantine,
    QuarantineEntry,
    QuarantineEvidence,
    node_class,
)
from activities.storage.sources import CheckpointSource
from api.compatibility import describe_mismatches, mismatches
from api.errors import (
    DigestMismatchError,
    ForbiddenError,
    GpuError,
    IncompatibleError,
    QuarantinedError,
    RestoreFailedError,
    WarmstartError,
)
from api.manifest import HostInfo, Manifest
from api.naming import MANIFEST_FILE
from api.reasons import Reason

# The failures that count as evidence against a version on a node class. Not the others:
# a digest mismatch is the bytes' fault, not the class's; in a restore WorkloadExited means
# the standby vanished (its pod deleted mid-restore) and WorkloadNotReady that the GMS
# loader was slow; a cancelled restore says nothing (none of them is a WarmstartError of
# this reason).
QUARANTINED_REASONS = frozenset({Reason.RESTORE_FAILED})


class Stages:
    """Wall time per stage, reported by heartbeat as each one starts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._name = ""
        self._started = time.monotonic()

    def start(self, name: str) -> None:
        self.finish()
        self._name, self._started = name, time.monotonic()
        if activity.in_activity():
            activity.heartbeat(Heartbeat(stage=name))

    def finish(self) -> None:
        if self._name:
            elapsed = time.monotonic() - self._started
            metrics.stage_finished(self._name, elapsed)
            spent = self.seconds.get(self._name, 0.0) + elapsed
            self.seconds[self._name] = round(spent, 4)
            self._name = ""

    @property
    def current(self) -> str:
        return self._name


async def open_version(
    held: AsyncExitStack,
    source: CheckpointSource,
    stages: Stages,
    checkpoint_id: str,
    version: str,
    storage: RemoteStorage | None,
    *,
    accept: Callable[[Manifest], None] | None = None,
    unverified: bool = False,
) -> Path:
    """The version directory to restore from, in use until `held` closes; a download of it
    is the `fetch` stage, after which `verify` goes on. `accept` sees the manifest of a
    version to download before its files are fetched, and raises to refuse it;
    `unverified`: one held back for its test restore may be it."""
    path = await held.enter_async_context(
        source.version_dir(
            checkpoint_id,
            version,
            storage,
            on_fetch=lambda: stages.start("fetch"),
            accept=accept,
            unverified=unverified,
        )
    )
    if stages.current == "fetch":
        stages.start("verify")
    return path


class NodeGate:
    """The checks a restore passes before it reads any artifact: compatibility of the
    manifest's host facts with the target's, then the quarantine of its version on the
    target's node class; and, after a failure, the evidence this node adds to it."""

    def __init__(self, *, criu_version: str, quarantine: Quarantine, node: str) -> None:
        self.criu_version = criu_version
        self.quarantine = quarantine
        self.node = node

    def check(self, manifest: Manifest, target: HostInfo) -> NodeClass:
        found = mismatches(
            captured=manifest.host,
            captured_criu=manifest.criu.version,
            node=target,
            node_criu=self.criu_version,
        )
        if found:
            raise IncompatibleError(describe_mismatches(manifest.checkpoint_id, found))
        cls = node_class(target, criu=self.criu_version)
        namespace = manifest.source.namespace
        entry = self.quarantine.find(
            manifest.checkpoint_id, manifest.version, cls, namespace=namespace
        )
        if entry is not None:
            raise QuarantinedError(entry.describe())
        return cls

    def remember(
        self,
        checkpoint_id: str,
        version: str,
        cls: NodeClass,
        err: WarmstartError,
        *,
        namespace: str,
    ) -> QuarantineEntry | None:
        """Record this node's failure of `namespace`'s `version` on `cls` where its reason
        counts; where the version now stands there (a quarantine once enough nodes failed)."""
        if err.reason not in QUARANTINED_REASONS:
            return None
        now = datetime.now(UTC)
        evidence = QuarantineEvidence(
            checkpoint_id=checkpoint_id,
            version=version,
            node_class=cls,
            node=self.node,
            reason=err.reason,
            message=str(err)[-2000:],
            since=now,
            last=now,
            namespace=namespace,
        )
        entry = self.quarantine.record(evidence)
        metrics.quarantine_recorded(err.reason, active=entry.active)
        if activity.in_activity():
            activity.logger.warning("%s", entry.describe())
        return entry


def require_manifest(version_dir: Path, sha256: str, *, checkpoint_id: str) -> None:
    """The version's manifest is the one its capture committed (`sha256` of its bytes, as
    the Checkpoint recorded it; "": not recorded, not checked): DigestMismatchError
    otherwise. The manifest names every file's digest, so nothing of a version changed where
    it is stored, manifest and all, reaches the gate or CRIU."""
    if sha256 and sha256_file(version_dir / MANIFEST_FILE) != sha256:
        raise DigestMismatchError(
            f"checkpoint {checkpoint_id} version {version_dir.name}: its manifest is not the "
            "one its capture committed (the version was changed where it is stored)"
        )


def require_namespace(manifest: Manifest, namespace: str) -> None:
    """A pod restores only a version captured in its own namespace (the manifest records
    where): ForbiddenError otherwise, naming neither that namespace nor its objects."""
    if manifest.source.namespace != namespace:
        raise ForbiddenError(
            f"checkpoint {manifest.checkpoint_id} version {manifest.version} was not captured "
            f"in namespace {namespace}: a pod restores only its own namespace's checkpoints"
        )


def as_restore_failure(err: BaseException, where: str) -> BaseException:
    """What a failed restore raises: warmstart's errors and a cancel as they are, an OSError
    or a GPU error as RestoreFailedError (so that the quarantine sees it)."""
    if isinstance(err, GpuError | OSError):
        return RestoreFailedError(f"{where}: {type(err).__name__}: {err}")
    return err


def failure_note(err: BaseException) -> str:
    """What `restore-failed` says: the reason, then the message."""
    if isinstance(err, WarmstartError):
        return f"{err.reason}: {err}"
    if isinstance(err, asyncio.CancelledError):
        return f"{Reason.CANCELLED}: the restore was cancelled"
    return f"{Reason.INTERNAL}: {type(err).__name__}: {err}"


def queue_reporter(stages: Stages) -> Callable[[int], None]:
    """While a restore waits for a CRIU slot (`activities.criu.slots`): the stage
    `criu-queue`, its place in the queue heartbeated."""

    def waiting(place: int) -> None:
        if stages.current != "criu-queue":
            stages.start("criu-queue")
        if activity.in_activity():
            activity.heartbeat(Heartbeat(stage=f"criu-queue (place {place})"))

    return waiting
