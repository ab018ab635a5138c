"""The checkpoint store on a node's filesystem: staging, atomic commit, verification.

Layout: `<root>/<checkpointID>/versions/<version>/` with `manifest.json` written last;
writers stage under `<root>/<checkpointID>/versions/tmp/<version>/` and rename into place.
"""

from __future__ import annotations

import asyncio
import errno
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

from temporalio import activity

from activities import metrics
from activities.contracts import (
    CommitInput,
    CommitResult,
    DiscardInput,
    ReleaseInput,
    UploadInput,
    UploadResult,
)
from activities.criu.predump import captured_criu_info
from activities.gpu.nvml import GpuFacts, NodeGpus, gpus_of_process, process_environment
from activities.host.files import fsync_dir, sha256_file, write_atomically
from activities.host.layout import NodeLayout
from activities.steps import StorageSteps
from activities.storage.catalog import STAGING, UNVERIFIED, committed_versions, load_manifest
from activities.storage.chunks import digest_with_table, has_table, table_path
from activities.storage.remote import RemoteStores, in_thread
from activities.storage.verified import VerifiedFiles
from api.errors import (
    CheckpointNotFoundError,
    DigestMismatchError,
    DumpFailedError,
    StorageError,
)
from api.manifest import CriuInfo, FileDigest, GpuDevice, HostInfo, Manifest, SourceInfo
from api.naming import MANIFEST_FILE, require_path_element

WORKLOAD_LOG = "workload-output.log"
# A full disk or quota: retrying the commit cannot help; the capture fails and says so.
_FULL = {errno.ENOSPC, errno.EDQUOT}


class CheckpointStore:
    def __init__(self, root: Path, *, verified: VerifiedFiles | None = None) -> None:
        self.root = root
        self._verified = verified

    def checkpoint_dir(self, checkpoint_id: str) -> Path:
        return self.root / require_path_element(checkpoint_id, what="checkpoint ID")

    def version_dir(self, checkpoint_id: str, version: str) -> Path:
        version = require_path_element(version, what="version")
        return self.checkpoint_dir(checkpoint_id) / "versions" / version

    def staging_dir(self, checkpoint_id: str, version: str) -> Path:
        version = require_path_element(version, what="version")
        return self.checkpoint_dir(checkpoint_id) / "versions" / STAGING / version

    def fresh_staging(self, checkpoint_id: str, version: str) -> Path:
        """An empty staging directory for `version` (what a failed attempt left is removed).

        Every directory from the root down is private (0700): a checkpoint holds a process's
        memory, with whatever secrets it had.
        """
        staging = self.staging_dir(checkpoint_id, version)
        shutil.rmtree(staging, ignore_errors=True)
        self.root.mkdir(parents=True, mode=0o700, exist_ok=True)
        depth = len(staging.relative_to(self.root).parts)
        for path in reversed([staging, *staging.parents[:depth]]):  # root first
            path.mkdir(mode=0o700, exist_ok=True)
            path.chmod(0o700)
        return staging

    def staged(self) -> list[tuple[str, Path]]:
        """Every staging directory, with the checkpoint ID it belongs to."""
        return [
            (staging.parents[2].name, staging)
            for staging in sorted(self.root.glob(f"*/versions/{STAGING}/*"))
            if staging.is_dir()
        ]

    def sweep_staging(self, *, older_than_seconds: float) -> list[Path]:
        """Remove staging left by dumps that cannot be running any more (a killed worker,
        a lost node): untouched for longer than a dump may take. Returns what it removed."""
        cutoff = time.time() - older_than_seconds
        removed = []
        for _checkpoint_id, staging in self.staged():
            if staging.stat().st_mtime < cutoff:
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(staging)
        return removed

    def commit(self, staging: Path, manifest: Manifest, *, unverified: bool = False) -> Path:
        """Write the manifest last, then rename the staged version into place; `unverified`:
        held back (`UNVERIFIED` inside it from the rename on) until `release`."""
        final = self.version_dir(manifest.checkpoint_id, manifest.version)
        if (final / MANIFEST_FILE).exists():
            return final  # a retried commit that already landed
        if unverified:
            write_atomically(staging / UNVERIFIED, b"")
        write_atomically(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        os.rename(staging, final)
        fsync_dir(final.parent)
        if self._verified is not None:
            digests = {f.path: f.sha256 for f in manifest.files}
            self._verified.remember(manifest.checkpoint_id, manifest.version, final, digests)
        return final

    def release(self, checkpoint_id: str, version: str) -> None:
        """Offer a version held back unverified: its test restore answered."""
        final = self.version_dir(checkpoint_id, version)
        if not (final / MANIFEST_FILE).is_file():
            raise CheckpointNotFoundError(
                f"checkpoint {checkpoint_id} version {version} was deleted before its test "
                "restore ended"
            )
        (final / UNVERIFIED).unlink(missing_ok=True)
        fsync_dir(final)

    def discard_unverified(self, checkpoint_id: str, version: str) -> bool:
        """Delete a version that is still held back unverified (its manifest first, so no
        half of it is ever committed); one offered already stays. Returns whether it went."""
        final = self.version_dir(checkpoint_id, version)
        if not (final / UNVERIFIED).exists():
            return False
        (final / MANIFEST_FILE).unlink(missing_ok=True)
        fsync_dir(final)
        shutil.rmtree(final, ignore_errors=True)
        return True

    def versions(self, checkpoint_id: str) -> list[Path]:
        """Committed versions (those with a manifest), oldest first; none held back."""
        return committed_versions(self.root, checkpoint_id)

    def find(self, checkpoint_id: str, version: str = "", *, unverified: bool = False) -> Path:
        """A committed version (the newest when none is named); one held back unverified
        only for its own test restore (`unverified`)."""
        if version:
            path = self.version_dir(checkpoint_id, version)
            held = (path / UNVERIFIED).exists()
            if (path / MANIFEST_FILE).is_file() and (unverified or not held):
                return path
            if held:
                raise CheckpointNotFoundError(
                    f"checkpoint {checkpoint_id} version {version} is held back: its capture's "
                    "test restore has not answered"
                )
            raise CheckpointNotFoundError(f"checkpoint {checkpoint_id} has no version {version}")
        committed = self.versions(checkpoint_id)
        if not committed:
            raise CheckpointNotFoundError(f"no committed checkpoint {checkpoint_id} in {self.root}")
        return committed[-1]

    def verify(self, version_dir: Path, *, checkpoint_id: str) -> Manifest:
        """Check the manifest and every file's size and SHA-256; raise naming the first bad one."""
        manifest = load_manifest(version_dir)
        if manifest.version != version_dir.name:
            raise DigestMismatchError(
                f"{version_dir / MANIFEST_FILE}: manifest is for version {manifest.version}, "
                f"found in {version_dir.name}"
            )
        if manifest.checkpoint_id != checkpoint_id:
            raise DigestMismatchError(
                f"{version_dir / MANIFEST_FILE}: manifest is for checkpoint "
                f"{manifest.checkpoint_id}, expected {checkpoint_id}"
            )
        known = self._verified.load(checkpoint_id, manifest.version) if self._verified else {}
        hashed = 0
        for entry in manifest.files:
            path = version_dir / entry.path
            where = f"checkpoint {checkpoint_id} version {manifest.version}: {entry.path}"
            if not path.is_file():
                raise DigestMismatchError(f"{where} is missing")
            size = path.stat().st_size
            if size != entry.size:
                raise DigestMismatchError(f"{where} has {size} bytes, manifest says {entry.size}")
            if self._verified and self._verified.is_unchanged(
                known, version_dir, entry.path, entry.sha256
            ):
                continue
            hashed += 1
            if sha256_file(path) != entry.sha256:
                raise DigestMismatchError(f"{where} does not match its SHA-256 digest")
        if self._verified is not None and hashed:
            digests = {f.path: f.sha256 for f in manifest.files}
            self._verified.remember(checkpoint_id, manifest.version, version_dir, digests)
        return manifest


def make_private(root: Path) -> None:
    """Directories 0700 and files 0600 under `root`, whatever modes their writers chose."""
    root.chmod(0o700)
    for dirpath, dirs, names in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o700)
        for name in names:
            os.chmod(os.path.join(dirpath, name), 0o600)


def digest_tree(root: Path) -> tuple[FileDigest, ...]:
    """Size and SHA-256 of every file under `root`, as paths relative to it. Page images get
    their chunk table written beside the version first (hashed in the same read), and the
    tables are files of the version like the others (`chunks`, decision 0039)."""
    found = [
        Path(dirpath, name).relative_to(root)
        for dirpath, _dirs, names in os.walk(root)
        for name in names
    ]
    known: dict[str, str] = {}
    for found_path in found:
        if has_table(str(found_path), (root / found_path).stat().st_size):
            digest, table = digest_with_table(root / found_path)
            known[str(found_path)] = digest
            table_file = root / table_path(str(found_path))
            for directory in reversed(table_file.relative_to(root).parents[:-1]):
                (root / directory).mkdir(mode=0o700, exist_ok=True)  # private as the rest
            fd = os.open(table_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(table.encode())
    entries = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            relative = str(path.relative_to(root))
            entries.append(
                FileDigest(
                    path=relative,
                    size=path.stat().st_size,
                    sha256=known.get(relative) or sha256_file(path),
                )
            )
    return tuple(sorted(entries, key=lambda e: e.path))


class StorageActivities(StorageSteps):
    """Node activities: commit a staged dump as a checkpoint version, or discard it."""

    def __init__(
        self,
        *,
        store: CheckpointStore,
        layout: NodeLayout,
        node: str,
        criu: CriuInfo,
        gpus: NodeGpus | None = None,
        remote: RemoteStores | None = None,
    ) -> None:
        self._store = store
        self._layout = layout
        self._node = node
        self._criu = criu
        self._gpus = gpus or NodeGpus()
        self._remote = remote

    @activity.defn
    async def commit_checkpoint(self, request: CommitInput) -> CommitResult:
        try:
            return await asyncio.to_thread(self._commit, request)
        except OSError as err:
            if err.errno not in _FULL:
                raise  # retried by the step's policy
            where = f"checkpoint {request.name} ({request.checkpoint_id}) version {request.version}"
            raise DumpFailedError(f"{where}: cannot commit: {err.strerror}") from err

    def _commit(self, request: CommitInput) -> CommitResult:
        staging = self._store.staging_dir(request.checkpoint_id, request.version)
        final = self._store.version_dir(request.checkpoint_id, request.version)
        if not staging.is_dir():
            if (final / MANIFEST_FILE).is_file():
                return _result(final, load_manifest(final))  # a retry after the rename
            raise DumpFailedError(
                f"checkpoint {request.name} ({request.checkpoint_id}) version {request.version}: "
                "staging directory is gone"
            )
        paths = self._layout.workload(request.name, request.checkpoint_id)
        # The workload's output file is re-created at this size on restore (CRIU checks it).
        # The dump copies it while the tree is frozen; an older dump did not.
        if not (staging / WORKLOAD_LOG).is_file():
            shutil.copyfile(paths.output_log, staging / WORKLOAD_LOG)
        make_private(staging)
        manifest = Manifest(
            checkpoint_id=request.checkpoint_id,
            version=request.version,
            identity=request.identity,
            created_at=datetime.now(UTC),
            source=self._source(request),
            criu=captured_criu_info(self._criu, staging),
            host=self._host(request),
            files=digest_tree(staging),
        )
        final = self._store.commit(staging, manifest, unverified=request.unverified)
        held = " (held back until its test restore answers)" if request.unverified else ""
        activity.logger.info("checkpoint %s committed at %s%s", request.checkpoint_id, final, held)
        return _result(final, manifest)

    def _host(self, request: CommitInput) -> HostInfo:
        """The GPUs the workload used: from its environment while it still runs (a
        leave-running dump), else from the environment it was launched with."""
        launch = self._layout.read_launch(request.name, request.checkpoint_id)
        env = process_environment(launch.pid) or dict(launch.workload.env)
        return host_info(gpus_of_process(env, self._gpus.facts()))

    def _source(self, request: CommitInput) -> SourceInfo:
        launch = self._layout.read_launch(request.name, request.checkpoint_id)
        paths = self._layout.workload(request.name, request.checkpoint_id)
        workload = launch.workload
        return SourceInfo(
            node=self._node,
            namespace=request.namespace,
            name=workload.name,
            command=workload.command,
            cwd=workload.cwd,
            pid=launch.pid,
            control_dir=str(paths.control_dir),
            log_path=str(paths.output_log),
            readiness=workload.readiness,
            health_url=workload.health_url,
        )

    @activity.defn
    async def upload_version(self, request: UploadInput) -> UploadResult:
        """Publish a version committed here to the request's remote store, heartbeating
        bytes and rate. A retry resumes from what is already stored; a version already there
        (its manifest uploaded) is not sent again."""
        if self._remote is None:
            raise StorageError(f"node {self._node} has no remote storage configured")
        local = self._store.find(request.checkpoint_id, request.version)
        # Off the loop: building the client may read a credentials Secret from the API server.
        backend = await asyncio.to_thread(self._remote.backend, request.storage)
        report = await in_thread(
            "upload",
            lambda progress: backend.upload_version(
                local,
                checkpoint_id=request.checkpoint_id,
                version=request.version,
                progress=progress,
            ),
        )
        uri = backend.uri(request.checkpoint_id, request.version)
        metrics.transferred("upload", report.bytes_transferred, report.seconds)
        activity.logger.info(
            "uploaded %s: %d of %d bytes sent in %.2f s",
            uri,
            report.bytes_transferred,
            report.bytes_total,
            report.seconds,
        )
        return UploadResult(
            storage_uri=uri,
            size_bytes=report.bytes_total,
            bytes_transferred=report.bytes_transferred,
            seconds=round(report.seconds, 3),
        )

    @activity.defn
    async def release_version(self, request: ReleaseInput) -> None:
        """Offer a version held back unverified (a verified cluster capture whose
        verification pod restored it); one offered already stays offered. A version gone
        meanwhile is CheckpointNotFound."""
        await asyncio.to_thread(self._store.release, request.checkpoint_id, request.version)
        activity.logger.info(
            "checkpoint %s version %s verified: offered", request.checkpoint_id, request.version
        )

    @activity.defn
    async def discard_staging(self, request: DiscardInput) -> None:
        staging = self._store.staging_dir(request.checkpoint_id, request.version)
        await asyncio.to_thread(shutil.rmtree, staging, True)
        if request.unverified and await asyncio.to_thread(
            self._store.discard_unverified, request.checkpoint_id, request.version
        ):
            activity.logger.warning(
                "checkpoint %s version %s deleted: never verified",
                request.checkpoint_id,
                request.version,
            )


def _result(final: Path, manifest: Manifest) -> CommitResult:
    return committed_result(final, manifest)


def committed_result(final: Path, manifest: Manifest) -> CommitResult:
    """What a commit reports of the committed version `final`: where, how big, and the
    SHA-256 of its manifest's bytes as written."""
    return CommitResult(
        storage_uri=final.as_uri(),
        size_bytes=manifest.size_bytes,
        manifest_sha256=sha256_file(final / MANIFEST_FILE),
    )


def host_info(gpu: GpuFacts) -> HostInfo:
    """This node's facts a restore is checked against, with the GPUs of `gpu`."""
    return HostInfo(
        kernel=platform.release(),
        arch=platform.machine(),
        gpu_driver=gpu.driver,
        cuda_version=gpu.cuda,
        gpus=tuple(GpuDevice(index=d.index, uuid=d.uuid, name=d.name) for d in gpu.devices),
        gpu_source=gpu.source if gpu.devices else "",
    )


def process_host_info(pid: int, gpus: NodeGpus) -> HostInfo:
    """The facts of a capture: the GPUs process `pid` uses, by its own environment first."""
    return host_info(gpus_of_process(process_environment(pid), gpus.facts()))
