"""The stores as a worker that mounts them sees them: the configured remote store (its
kind's standard credentials) for retention and the catalog, and the catalog of this
machine's checkpoint root with the remote store behind it. Without remote storage nothing
of a backend is imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from activities.storage.catalog import Catalog, LocalCatalog
from workers.settings import Settings

if TYPE_CHECKING:
    from activities.storage.objectstore import Backend
    from activities.storage.retention import RemoteVersions


def remote_backend(settings: Settings) -> Backend | None:
    """The settings' remote store, or None without one."""
    storage = settings.storage.location()
    if storage is None:
        return None
    from activities.storage.objectstore.transfer import TransferSettings
    from activities.storage.remote import RemoteStores

    stores = RemoteStores(
        transfer=TransferSettings(),  # listing and deleting move no file bytes
        own_endpoints=settings.storage.own_endpoints(),
    )
    return stores.backend(storage)


def remote_versions(settings: Settings) -> RemoteVersions | None:
    backend = remote_backend(settings)
    if backend is None:
        return None
    from activities.storage.retention import RemoteVersions

    return RemoteVersions(backend)


def store_catalog(settings: Settings) -> Catalog:
    """The committed checkpoints of this machine's checkpoint root, then (with remote
    storage) those only the remote store holds: what the control worker answers the CLI
    from, and where a local restore looks up what it restores on this node."""
    local = LocalCatalog(settings.checkpoint_root)
    if not settings.storage.configured:
        return local
    from activities.storage.remote_catalog import FallbackCatalog, RemoteCatalog

    def remote() -> Catalog:
        backend = remote_backend(settings)
        assert backend is not None
        return RemoteCatalog(backend)

    return FallbackCatalog(local, remote)
