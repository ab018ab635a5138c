"""Retention activities over the checkpoint stores: list versions, find what is protected,
delete versions, sweep orphans; the same for the remote store where one is configured.

They run on the control queue: the store is one filesystem root shared by every node (the
RWX volume on a cluster, the state directory locally), so one control-side worker that
mounts it can judge and delete for all nodes; no node's own state is touched. With remote
storage, the remote store is the durable one (captures publish there) and gets the same
policy, through its backend.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowExecution
from temporalio.common import SearchAttributeKey

from activities.contracts import (
    CheckpointVersions,
    DeleteVersionInput,
    DeleteVersionResult,
    ListVersionsInput,
    ProtectedInput,
    ProtectedVersions,
    SweepInput,
    SweepResult,
    UploadSweepInput,
    UploadSweepResult,
)
from activities.host.files import fsync_dir
from activities.steps import RetentionSteps
from activities.storage.catalog import STAGING, LocalCatalog, committed_versions, entry_of
from activities.storage.objectstore import Backend
from activities.storage.quarantine import QUARANTINE_DIR, Quarantine
from activities.storage.store import CheckpointStore
from api.errors import (
    CheckpointNotFoundError,
    DigestMismatchError,
    InvalidSpecError,
    UnavailableError,
)
from api.naming import MANIFEST_FILE, RESTORE_WORKFLOW, is_checkpoint_id
from api.retention import CheckpointVersion, ProtectedRef

log = logging.getLogger(__name__)
# The key RestoreWorkflow indexes its checkpoint under (workflows.visibility.CHECKPOINT_ID;
# the layers keep activities from importing it).
CHECKPOINT_ID_KEY = SearchAttributeKey.for_keyword("WarmstartCheckpointID")

# Versions that Ready resources reference (a cluster reads Checkpoint resources; locally
# there are none).
ReadyReferences = Callable[[], Awaitable[Sequence[ProtectedRef]]]


async def no_ready_references() -> Sequence[ProtectedRef]:
    return ()


class RetentionActivities(RetentionSteps):
    """Control-queue activities over the shared checkpoint store (see the module docstring)."""

    def __init__(
        self,
        *,
        store: CheckpointStore,
        client: Client,
        ready_references: ReadyReferences = no_ready_references,
        remote: RemoteVersions | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        """`remote`: the configured remote store, if any; `quarantine`: the store's records
        with the policy they are judged by (default: the default policy)."""
        self._store = store
        self._client = client
        self._ready_references = ready_references
        self._remote = remote
        self._quarantine = quarantine or Quarantine(store.root)

    @activity.defn
    async def list_checkpoint_versions(self, request: ListVersionsInput) -> CheckpointVersions:
        """Every committed version (a readable manifest); anything else is not listed."""
        return CheckpointVersions(versions=tuple(await asyncio.to_thread(self._list)))

    def _list(self) -> list[CheckpointVersion]:
        return [
            CheckpointVersion(
                checkpoint_id=entry.checkpoint_id,
                version=entry.version,
                namespace=entry.namespace,
                size_bytes=entry.size_bytes,
                created_at=entry.created_at,
            )
            for entry in LocalCatalog(self._store.root).checkpoints()
        ]

    @activity.defn
    async def protected_versions(self, request: ProtectedInput) -> ProtectedVersions:
        """Versions in use: those of running restores (Temporal visibility) and those Ready
        resources reference (the injected source)."""
        live = await live_restores(self._client)
        ready = await self._ready_references()
        return ProtectedVersions(refs=(*live, *ready))

    @activity.defn
    async def delete_version(self, request: DeleteVersionInput) -> DeleteVersionResult:
        """Remove the manifest first (the version stops existing for every reader), then
        its files. Idempotent: a retry after a crash finishes the removal."""
        version_dir = self._store.version_dir(request.checkpoint_id, request.version)
        existed = await asyncio.to_thread(unpublish, version_dir)
        await asyncio.to_thread(shutil.rmtree, version_dir, True)
        activity.logger.info(
            "checkpoint %s version %s deleted", request.checkpoint_id, request.version
        )
        return DeleteVersionResult(existed=existed)

    @activity.defn
    async def sweep_orphans(self, request: SweepInput) -> SweepResult:
        """Staging older than the threshold, version directories whose manifest is gone (a
        deletion that crashed and ran out of retries) untouched as long, quarantine records
        of checkpoints with no version left, and lapsed quarantine records."""
        return await asyncio.to_thread(sweep, self._store, request, self._quarantine)

    @activity.defn
    async def list_remote_versions(self, request: ListVersionsInput) -> CheckpointVersions:
        """Every committed version in the remote store, as its index describes it."""
        remote = self._require_remote()
        versions = await asyncio.to_thread(remote.versions)
        return CheckpointVersions(versions=tuple(versions), location=remote.uri)

    @activity.defn
    async def delete_remote_version(self, request: DeleteVersionInput) -> DeleteVersionResult:
        """Delete a version in the remote store: its manifest first, then everything else."""
        existed = await asyncio.to_thread(
            self._require_remote().delete, request.checkpoint_id, request.version
        )
        activity.logger.info(
            "checkpoint %s version %s deleted in %s",
            request.checkpoint_id,
            request.version,
            self._require_remote().uri,
        )
        return DeleteVersionResult(existed=existed)

    @activity.defn
    async def sweep_remote_uploads(self, request: UploadSweepInput) -> UploadSweepResult:
        """Abort incomplete multipart uploads started longer ago than the threshold (an
        uploader that crashed and was never retried leaves its parts, which cost storage)."""
        remote = self._require_remote()
        if request.dry_run:
            stale = await asyncio.to_thread(remote.stale_uploads, request.older_than_seconds)
        else:
            stale = await asyncio.to_thread(remote.abort_stale_uploads, request.older_than_seconds)
        return UploadSweepResult(aborted=tuple(stale))

    def _require_remote(self) -> RemoteVersions:
        if self._remote is None:
            raise InvalidSpecError(
                "retention: the request includes remote storage, but this worker has none "
                "configured (WARMSTART_STORAGE__S3_BUCKET or another kind's settings)"
            )
        return self._remote


class RemoteVersions:
    """The committed versions of one remote store, as retention needs them: found across
    checkpoints, described by the index (a manifest is read only for a version the index
    lacks, which is then indexed: versions committed before there was one), deleted, and
    the store's abandoned transfers. Blocking: call it in a thread."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    @property
    def uri(self) -> str:
        return self.backend.uri()

    def versions(self) -> list[CheckpointVersion]:
        """Every committed version; one that vanished meanwhile or whose manifest is
        damaged is left out (never deleted unjudged), with a warning."""
        backend = self.backend
        indexed = {(e.checkpoint_id, e.version): e for e in backend.listed()}
        found = []
        for checkpoint_id in backend.checkpoint_ids():
            for version in backend.list_versions(checkpoint_id):
                entry = indexed.get((checkpoint_id, version))
                if entry is None:
                    try:
                        manifest = backend.read_manifest(checkpoint_id, version)
                    except (CheckpointNotFoundError, DigestMismatchError) as err:
                        log.warning(
                            "checkpoint %s version %s skipped: %s", checkpoint_id, version, err
                        )
                        continue
                    backend.index(manifest)
                    entry = entry_of(manifest.model_dump(mode="json"), backend.uri())
                found.append(
                    CheckpointVersion(
                        checkpoint_id=checkpoint_id,
                        version=version,
                        namespace=entry.namespace,
                        size_bytes=entry.size_bytes,
                        created_at=entry.created_at,
                    )
                )
        return found

    def delete(self, checkpoint_id: str, version: str) -> bool:
        """Delete a version (manifest first); returns whether it was still committed.
        Idempotent: a retry after a crash finishes the removal."""
        return self.backend.delete_version(checkpoint_id=checkpoint_id, version=version)

    def stale_uploads(self, older_than_seconds: float) -> list[str]:
        """What `abort_stale_uploads` would abort, aborting nothing."""
        return self.backend.sweep_incomplete(older_than_seconds=older_than_seconds, dry_run=True)

    def abort_stale_uploads(self, older_than_seconds: float) -> list[str]:
        return self.backend.sweep_incomplete(older_than_seconds=older_than_seconds, dry_run=False)


def unpublish(version_dir: Path) -> bool:
    """Remove a version's commit marker, durably; returns whether it was there."""
    try:
        (version_dir / MANIFEST_FILE).unlink()
    except FileNotFoundError:
        return False
    fsync_dir(version_dir)
    return True


def sweep(
    store: CheckpointStore, request: SweepInput, quarantine: Quarantine | None = None
) -> SweepResult:
    cutoff = time.time() - request.staging_older_than_seconds
    if request.dry_run:
        staging = [p for _id, p in store.staged() if p.stat().st_mtime < cutoff]
    else:
        staging = store.sweep_staging(older_than_seconds=request.staging_older_than_seconds)
    half = [p for p in _half_deleted(store.root) if _untouched_since(p, cutoff)]
    cleared = [
        p for p in _checkpoint_dirs(store.root) if not committed_versions(store.root, p.name)
    ]
    quarantine = quarantine or Quarantine(store.root)
    quarantined = [q for p in cleared for q in sorted((p / QUARANTINE_DIR).rglob("*.json"))]
    gone = set(quarantined)
    quarantined += [p for p in quarantine.lapsed() if p not in gone]
    if not request.dry_run:
        for path in half:
            shutil.rmtree(path, ignore_errors=True)
        for checkpoint in cleared:
            quarantine.clear(checkpoint.name)
        quarantine.sweep_lapsed()
    return SweepResult(
        staging=_relative(store.root, staging),
        half_deleted=_relative(store.root, half),
        quarantine=_relative(store.root, quarantined),
    )


def _checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and is_checkpoint_id(p.name))


def _half_deleted(root: Path) -> list[Path]:
    """Version directories without a manifest. A commit renames a staged directory that
    already holds its manifest, so only a deletion interrupted after unpublishing leaves one."""
    return [
        version
        for checkpoint in _checkpoint_dirs(root)
        for version in sorted((checkpoint / "versions").glob("*"))
        if version.is_dir() and version.name != STAGING and not (version / MANIFEST_FILE).exists()
    ]


def _untouched_since(path: Path, cutoff: float) -> bool:
    """Nothing under `path` changed after `cutoff`: no writer that lands files in place
    before their manifest (a cache fill) can still be at work there."""
    for dirpath, _dirs, names in os.walk(path):
        for entry in (dirpath, *(os.path.join(dirpath, n) for n in names)):
            try:
                if os.lstat(entry).st_mtime >= cutoff:
                    return False
            except FileNotFoundError:
                continue
    return True


def _relative(root: Path, paths: Sequence[Path]) -> tuple[str, ...]:
    return tuple(os.path.relpath(p, root) for p in paths)


async def live_restores(client: Client) -> list[ProtectedRef]:
    """A reference per running RestoreWorkflow: its checkpoint and version from its start
    input (an empty version restores the newest), else from its search attribute.

    Visibility is eventually consistent: a restore started a second ago may be missed; it
    verifies every file before use and falls back to a cold start if its version vanishes.
    """
    query = f"WorkflowType = '{RESTORE_WORKFLOW}' AND ExecutionStatus = 'Running'"
    refs = []
    async for execution in client.list_workflows(query):
        refs.append(await _restore_ref(client, execution))
    return refs


async def _restore_ref(client: Client, execution: WorkflowExecution) -> ProtectedRef:
    request = await _start_input(client, execution)
    checkpoint_id = str(request.get("checkpoint_id") or "")
    checkpoint_id = checkpoint_id or (
        execution.typed_search_attributes.get(CHECKPOINT_ID_KEY) or ""
    )
    if not checkpoint_id:
        # Deleting what it restores would be worse than retrying later.
        raise UnavailableError(
            f"restore {execution.id}: cannot tell which checkpoint it restores (retried later)"
        )
    version = str(request.get("version") or "")
    return ProtectedRef(checkpoint_id=checkpoint_id, version=version, referrer=execution.id)


async def _start_input(client: Client, execution: WorkflowExecution) -> dict[str, Any]:
    """The run's request as a plain mapping (decoded with the client's converter and codec)."""
    handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
    async for event in handle.fetch_history_events():
        payloads = event.workflow_execution_started_event_attributes.input.payloads
        if not payloads:
            return {}
        [decoded] = await client.data_converter.decode([payloads[0]], [dict[str, Any]])
        return decoded if isinstance(decoded, dict) else {}
    return {}
