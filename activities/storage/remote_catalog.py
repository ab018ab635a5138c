"""The catalog of a remote store: the versions its backend's index lists (no manifest is
read to list them; one is read to describe a version), behind the same interface as the
node's `LocalCatalog`; and `FallbackCatalog`, which asks a local catalog first."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from activities.storage.catalog import Catalog, CatalogEntry, find_entry
from api.catalog import newest_first
from api.errors import CheckpointNotFoundError

if TYPE_CHECKING:
    from activities.storage.objectstore import Backend
    from api.manifest import Manifest


class RemoteCatalog:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def checkpoints(self) -> list[CatalogEntry]:
        return self._backend.listed()

    def find(self, ref: str) -> CatalogEntry:
        return find_entry(self.checkpoints(), ref, where=self._backend.uri())

    def manifest(self, entry: CatalogEntry) -> Manifest:
        return self._backend.read_manifest(entry.checkpoint_id, entry.version)


class FallbackCatalog:
    """A local catalog (a node's root, the control side's PVC), then a remote store's for
    what it does not hold. The remote one is made only when asked (a client costs start
    time that a name held locally does not need)."""

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
        return newest_first([*local, *remote])

    def find(self, ref: str) -> CatalogEntry:
        try:
            return self._local.find(ref)
        except CheckpointNotFoundError:
            return self._remote_catalog.find(ref)

    def manifest(self, entry: CatalogEntry) -> Manifest:
        """The local copy's manifest where there is one, else the remote store's."""
        try:
            return self._local.manifest(entry)
        except CheckpointNotFoundError:
            return self._remote_catalog.manifest(entry)
