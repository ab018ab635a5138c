"""The remote store as the CLI and the control worker see it: the settings' S3 location
(boto3's standard credential chain) for retention, and the catalog that lists what it holds
after what this node holds. Without remote storage nothing of it is imported: `warmstart
list` starts fast (decision 0007)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from activities.storage.catalog import Catalog, LocalCatalog
from workers.settings import Settings

if TYPE_CHECKING:
    from activities.storage.retention import RemoteVersions


def remote_versions(settings: Settings) -> RemoteVersions | None:
    """The settings' S3 location (boto3's standard credential chain), or None without one."""
    if not settings.storage.s3_bucket:
        return None
    from activities.storage.objectstore.transfer import TransferSettings
    from activities.storage.remote import RemoteStores
    from activities.storage.retention import RemoteVersions
    from workers.operations import remote_storage

    storage = remote_storage(settings)
    assert storage is not None
    stores = RemoteStores(
        transfer=TransferSettings(),  # listing and deleting move no file bytes
        endpoint=settings.storage.s3_endpoint,
        region=settings.storage.s3_region,
    )
    backend = stores.backend(storage)
    return RemoteVersions(client=backend.client, location=backend.location)


def checkpoint_catalog(settings: Settings) -> Catalog:
    """This node's committed checkpoints, then (with remote storage) those only stored there."""
    local = LocalCatalog(settings.checkpoint_root)
    if not settings.storage.s3_bucket:
        return local
    from activities.storage.remote_catalog import FallbackCatalog, RemoteCatalog

    def remote() -> Catalog:
        versions = remote_versions(settings)
        assert versions is not None
        return RemoteCatalog(versions)

    return FallbackCatalog(local, remote)
