"""The catalog of the remote store: committed versions in an S3 location, listed from
their manifests (a version without one does not exist), behind the same interface as the
node's `LocalCatalog`; and `FallbackCatalog`, which asks the node first."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from activities.storage.catalog import Catalog, CatalogEntry, entry_of, find_entry
from api.errors import CheckpointNotFoundError, DigestMismatchError
from api.manifest import Manifest

if TYPE_CHECKING:
    from activities.storage.retention import RemoteVersions


class RemoteCatalog:
    def __init__(self, remote: RemoteVersions) -> None:
        self._remote = remote

    def checkpoints(self) -> list[CatalogEntry]:
        backend, found = self._remote.backend, []
        for checkpoint_id in self._remote.checkpoint_ids():
            for version in backend.list_versions(checkpoint_id):
                try:
                    manifest = backend.read_manifest(checkpoint_id, version)
                except (CheckpointNotFoundError, DigestMismatchError):
                    continue  # deleted meanwhile, or damaged: not a version to offer
                doc = manifest.model_dump(mode="json")
                found.append(entry_of(doc, backend.uri(checkpoint_id, version)))
        return sorted(found, key=lambda e: e.created_at, reverse=True)

    def find(self, ref: str) -> CatalogEntry:
        return find_entry(self.checkpoints(), ref, where=self._remote.uri)

    def manifest(self, entry: CatalogEntry) -> Manifest:
        return Manifest.model_validate(entry.document)  # read and checked when listed


class FallbackCatalog:
    """The node's catalog, then the remote store's for what the node does not hold. The
    remote one is made only when asked (a boto3 client costs start time that a name the
    node holds does not need)."""

    def __init__(self, local: Catalog, remote: Callable[[], Catalog]) -> None:
        self._local = local
        self._make_remote = remote
        self._remote: Catalog | None = None

    @property
    def _remote_catalog(self) -> Catalog:
        if self._remote is None:
            self._remote = self._make_remote()
        return self._remote

    def checkpoints(self) -> list[CatalogEntry]:
        local = self._local.checkpoints()
        held = {(e.checkpoint_id, e.version) for e in local}
        remote = [
            e
            for e in self._remote_catalog.checkpoints()
            if (e.checkpoint_id, e.version) not in held
        ]
        return sorted([*local, *remote], key=lambda e: e.created_at, reverse=True)

    def find(self, ref: str) -> CatalogEntry:
        try:
            return self._local.find(ref)
        except CheckpointNotFoundError:
            return self._remote_catalog.find(ref)

    def manifest(self, entry: CatalogEntry) -> Manifest:
        if entry.location.startswith("s3://"):
            return self._remote_catalog.manifest(entry)
        return self._local.manifest(entry)
