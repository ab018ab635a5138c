"""The checkpoint store on a node's filesystem: staging, atomic commit, listing, verification.

Layout: `<root>/<checkpointID>/versions/<version>/` with `manifest.json` written last;
writers stage under `<root>/<checkpointID>/versions/tmp/<uuid>/` and rename into place.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError
from temporalio import activity

from activities.contracts import CommitInput, CommitResult, DiscardInput
from activities.errors import fatal
from activities.files import fsync_dir, sha256_file, write_atomically
from activities.gpu import read_gpu_facts
from activities.verified import VerifiedFiles
from api.manifest import MANIFEST_FILE, CriuInfo, FileDigest, HostInfo, Manifest, SourceInfo
from api.naming import require_path_element
from api.reasons import Reason

WORKLOAD_LOG = "workload-output.log"


class StoreError(Exception):
    """Base of checkpoint-store errors."""


class CheckpointNotFoundError(StoreError):
    pass


class DigestMismatchError(StoreError):
    """An artifact is missing, truncated or altered; the message names the file."""


class CheckpointStore:
    def __init__(self, root: Path, *, verified: VerifiedFiles | None = None) -> None:
        self.root = root
        self._verified = verified

    def checkpoint_dir(self, checkpoint_id: str) -> Path:
        return self.root / require_path_element(checkpoint_id, what="checkpoint ID")

    def version_dir(self, checkpoint_id: str, version: str) -> Path:
        version = require_path_element(version, what="version")
        return self.checkpoint_dir(checkpoint_id) / "versions" / version

    def new_staging(self, checkpoint_id: str) -> Path:
        staging = self.checkpoint_dir(checkpoint_id) / "versions" / "tmp" / uuid.uuid4().hex
        staging.mkdir(parents=True)
        return staging

    def commit(self, staging: Path, manifest: Manifest) -> Path:
        """Write the manifest last, then rename the staged version into place."""
        final = self.version_dir(manifest.checkpoint_id, manifest.version)
        if (final / MANIFEST_FILE).exists():
            return final  # a retried commit that already landed
        write_atomically(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        os.rename(staging, final)
        fsync_dir(final.parent)
        if self._verified is not None:
            digests = {f.path: f.sha256 for f in manifest.files}
            self._verified.remember(manifest.checkpoint_id, manifest.version, final, digests)
        return final

    def versions(self, checkpoint_id: str) -> list[Path]:
        """Committed versions (those with a manifest), oldest first."""
        versions = self.checkpoint_dir(checkpoint_id) / "versions"
        if not versions.is_dir():
            return []
        return sorted(
            p for p in versions.iterdir() if p.name != "tmp" and (p / MANIFEST_FILE).is_file()
        )

    def find(self, checkpoint_id: str, version: str = "") -> Path:
        if version:
            path = self.version_dir(checkpoint_id, version)
            if (path / MANIFEST_FILE).is_file():
                return path
            raise CheckpointNotFoundError(f"checkpoint {checkpoint_id} has no version {version}")
        committed = self.versions(checkpoint_id)
        if not committed:
            raise CheckpointNotFoundError(f"no committed checkpoint {checkpoint_id} in {self.root}")
        return committed[-1]

    def manifests(self) -> list[Manifest]:
        """Every committed manifest in the store, newest first."""
        found = []
        if self.root.is_dir():
            for entry in sorted(self.root.iterdir()):
                for version in self.versions(entry.name) if entry.is_dir() else []:
                    try:
                        found.append(load_manifest(version))
                    except StoreError:
                        continue
        return sorted(found, key=lambda m: m.created_at, reverse=True)

    def verify(self, version_dir: Path, *, checkpoint_id: str) -> Manifest:
        """Check the manifest and every file's size and SHA-256; raise naming the first bad one."""
        manifest = load_manifest(version_dir)
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


def load_manifest(version_dir: Path) -> Manifest:
    path = version_dir / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as err:
        raise CheckpointNotFoundError(f"{path} is missing") from err
    except ValidationError as err:
        raise DigestMismatchError(f"{path} is not a valid manifest: {err}") from err


def digest_tree(root: Path) -> tuple[FileDigest, ...]:
    """Size and SHA-256 of every file under `root`, as paths relative to it."""
    entries = []
    for dirpath, _dirs, names in os.walk(root):
        for name in sorted(names):
            path = Path(dirpath, name)
            entries.append(
                FileDigest(
                    path=str(path.relative_to(root)),
                    size=path.stat().st_size,
                    sha256=sha256_file(path),
                )
            )
    return tuple(sorted(entries, key=lambda e: e.path))


class StorageActivities:
    """Node activities: commit a staged dump as a checkpoint version, or discard it."""

    def __init__(
        self, *, store: CheckpointStore, criu_version: str, criu_options: tuple[str, ...]
    ) -> None:
        self._store = store
        self._criu = CriuInfo(version=criu_version, options=criu_options)

    @activity.defn(name="commit_checkpoint")
    async def commit_checkpoint(self, request: CommitInput) -> CommitResult:
        return await asyncio.to_thread(self._commit, request)

    def _commit(self, request: CommitInput) -> CommitResult:
        staging = Path(request.staging_dir)
        if not staging.is_dir():
            final = self._store.version_dir(request.checkpoint_id, request.version)
            if (final / MANIFEST_FILE).is_file():
                return _result(final, load_manifest(final))
            raise fatal(Reason.DUMP_FAILED, f"staging directory {staging} is gone")
        # The workload's output file is re-created at this size on restore (CRIU checks it).
        shutil.copyfile(request.launch.log_path, staging / WORKLOAD_LOG)
        manifest = Manifest(
            checkpoint_id=request.checkpoint_id,
            version=request.version,
            identity=request.identity,
            created_at=datetime.now(UTC),
            source=_source(request),
            criu=self._criu,
            host=_host_info(),
            files=digest_tree(staging),
        )
        final = self._store.commit(staging, manifest)
        activity.logger.info("checkpoint %s committed at %s", request.checkpoint_id, final)
        return _result(final, manifest)

    @activity.defn(name="discard_staging")
    async def discard_staging(self, request: DiscardInput) -> None:
        staging = Path(request.staging_dir)
        if staging.parent.name != "tmp" or staging.parent.parent.name != "versions":
            raise fatal(Reason.INVALID_SPEC, f"{staging} is not a staging directory")
        await asyncio.to_thread(shutil.rmtree, staging, True)


def _result(final: Path, manifest: Manifest) -> CommitResult:
    return CommitResult(
        version_dir=str(final),
        storage_uri=final.as_uri(),
        size_bytes=manifest.size_bytes,
        file_count=len(manifest.files),
    )


def _source(request: CommitInput) -> SourceInfo:
    workload = request.workload
    return SourceInfo(
        node=request.node,
        namespace=request.namespace,
        name=workload.name,
        command=workload.command,
        cwd=workload.cwd,
        pid=request.launch.pid,
        control_dir=request.launch.control_dir,
        log_path=request.launch.log_path,
        readiness=workload.readiness,
        health_url=workload.health_url,
    )


def _host_info() -> HostInfo:
    gpu = read_gpu_facts()
    return HostInfo(
        kernel=platform.release(),
        arch=platform.machine(),
        gpu_driver=gpu.driver,
        cuda_version=gpu.cuda,
        gpus=gpu.devices,
    )
