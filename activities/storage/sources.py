"""Where a restore reads its version: this node's store (captured here, or the PVC every
node mounts), else the node cache of that very location, filled from the remote storage the
request names (`cache.location_key`: a version fetched from one store is never found for
another).

With remote storage an empty version means the newest one *there* (the node's copy may be
older). A version found in neither place is CheckpointNotFoundError naming both.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from temporalio import activity

from activities import metrics
from activities.contracts import PrefetchInput, PrefetchResult, RemoteStorage
from activities.steps import PrefetchSteps
from activities.storage.catalog import UNVERIFIED
from activities.storage.remote import RemoteStores, heartbeating
from activities.storage.store import CheckpointStore
from activities.storage.streaming import StreamPlan, pick_streamed, why_not_streamed
from api.errors import CheckpointNotFoundError, StorageError
from api.manifest import Manifest
from api.naming import MANIFEST_FILE

if TYPE_CHECKING:
    from activities.storage.objectstore import Backend
    from activities.storage.objectstore.cache import NodeCache


class CheckpointSource:
    def __init__(
        self,
        *,
        store: CheckpointStore,
        cache: NodeCache | None = None,
        remote: RemoteStores | None = None,
    ) -> None:
        self.store = store
        self._cache = cache
        self._remote = remote

    @asynccontextmanager
    async def version_dir(
        self,
        checkpoint_id: str,
        version: str,
        storage: RemoteStorage | None,
        *,
        on_fetch: Callable[[], None] = lambda: None,
        accept: Callable[[Manifest], None] | None = None,
        unverified: bool = False,
    ) -> AsyncIterator[Path]:
        """The committed version directory to restore from, held in use (the cache does not
        evict it) until the block ends. `on_fetch` is called before a download starts;
        `accept` sees a version's manifest before its files are downloaded (and raises to
        refuse it); `unverified`: a version of this node's store held back for its test
        restore may be it (decision 0045)."""
        if storage is None:
            yield self.store.find(checkpoint_id, version, unverified=unverified)
            return
        if self._cache is None or self._remote is None:
            raise StorageError(f"{storage.uri}: this node has no cache for remote checkpoints")
        from activities.storage.objectstore.cache import location_key

        cache, remote = self._cache, self._remote
        location = location_key(remote.resolved(storage))

        async def backend() -> Backend:
            # Only when the bucket is needed: building the client may read a credentials
            # Secret from the API server (off the loop), a round trip a held version skips.
            return await asyncio.to_thread(remote.backend, storage)

        if not version:
            listing = (await backend()).list_versions
            version = await asyncio.to_thread(_newest, listing, checkpoint_id, storage)
        local = self.store.version_dir(checkpoint_id, version)
        if (local / MANIFEST_FILE).is_file() and not (local / UNVERIFIED).exists():
            yield local
            return
        with cache.using(location, checkpoint_id, version):
            cached = cache.version_dir(location, checkpoint_id, version)
            if (cached / MANIFEST_FILE).is_file():  # the cache keeps the store's layout
                metrics.cache_lookup(hit=True)
                yield cached
                return
            metrics.cache_lookup(hit=False)
            on_fetch()
            source = await backend()
            yield await heartbeating(
                "fetch",
                lambda progress: cache.fetch(
                    source,
                    location=location,
                    checkpoint_id=checkpoint_id,
                    version=version,
                    progress=progress,
                    accept=accept,
                ),
            )

    async def lacks(self, checkpoint_id: str, version: str, storage: RemoteStorage) -> str:
        """The version a restore from `storage` would read (the newest there when empty) if
        this node has it neither in its store nor in its cache, else "" (no I/O but the
        listing an empty version needs)."""
        if self._cache is None or self._remote is None:
            return ""  # version_dir says why it cannot be restored
        from activities.storage.objectstore.cache import location_key

        remote = self._remote
        if not version:
            source = await asyncio.to_thread(remote.backend, storage)
            version = await asyncio.to_thread(_newest, source.list_versions, checkpoint_id, storage)
        location = location_key(remote.resolved(storage))
        cached = self._cache.version_dir(location, checkpoint_id, version)
        local = self.store.version_dir(checkpoint_id, version)
        offered = (local / MANIFEST_FILE).is_file() and not (local / UNVERIFIED).exists()
        if offered or (cached / MANIFEST_FILE).is_file():
            return ""
        return version

    async def stream_plan(
        self, checkpoint_id: str, version: str, storage: RemoteStorage, *, dest: Path
    ) -> StreamPlan | str:
        """Version `version` (one this node lacks, `lacks`), its files but the page images
        fetched into `dest` (decision 0039); else why it cannot stream (it must be
        downloaded first)."""
        assert self._remote is not None
        from activities.storage.objectstore.cache import location_key
        from activities.storage.objectstore.s3 import S3Backend

        remote = self._remote
        source = await asyncio.to_thread(remote.backend, storage)
        location = location_key(remote.resolved(storage))
        if not isinstance(source, S3Backend):
            return f"storage of kind {storage.kind!r} cannot stream"
        manifest, raw, streamed = await asyncio.to_thread(
            lambda: source.download_streamed(
                checkpoint_id=checkpoint_id, version=version, dest_dir=dest, streamed=pick_streamed
            )
        )
        why = why_not_streamed(manifest, streamed)
        if why:
            shutil.rmtree(dest, ignore_errors=True)
            return why
        return StreamPlan(
            manifest=manifest,
            version_dir=dest,
            streamed=streamed,
            bucket=source.location.bucket,
            connection=source.connection,
            location=location,
            raw_manifest=raw,
        )

    def adopt(self, plan: StreamPlan) -> bool:
        """A streamed version, complete (every chunk checked), joins the node cache as if it
        had been downloaded: the next restore on this node reads it from there. False where
        it cannot (the cache got it meanwhile, or it does not fit); blocking."""
        if self._cache is None:
            return False
        return self._cache.adopt(
            plan.location,
            plan.manifest,
            plan.raw_manifest,
            complete_dir=plan.version_dir,
        )

    async def prefetch(
        self, checkpoint_id: str, version: str, storage: RemoteStorage
    ) -> PrefetchResult:
        """Fill the cache with a version (newest when empty) unless this node has it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        fetched = False

        def fetching() -> None:
            nonlocal fetched
            fetched = True

        async with self.version_dir(
            checkpoint_id, version, storage, on_fetch=fetching
        ) as version_dir:
            manifest = await asyncio.to_thread(
                self.store.verify, version_dir, checkpoint_id=checkpoint_id
            )
        return PrefetchResult(
            version=manifest.version,
            size_bytes=sum(f.size for f in manifest.files),
            downloaded=fetched,
            seconds=round(loop.time() - started, 3),
        )


def _newest(
    list_versions: Callable[[str], list[str]], checkpoint_id: str, storage: RemoteStorage
) -> str:
    versions = list_versions(checkpoint_id)
    if not versions:
        raise CheckpointNotFoundError(f"no committed checkpoint {checkpoint_id} in {storage.uri}")
    return versions[-1]


class PrefetchActivities(PrefetchSteps):
    """The node activity that warms this node's cache before pods land."""

    def __init__(self, source: CheckpointSource) -> None:
        self._source = source

    @activity.defn
    async def prefetch_version(self, request: PrefetchInput) -> PrefetchResult:
        result = await self._source.prefetch(
            request.checkpoint_id, request.version, request.storage
        )
        activity.logger.info(
            "prefetched %s version %s (%d bytes, %s) in %.2f s",
            request.checkpoint_id,
            result.version,
            result.size_bytes,
            "downloaded" if result.downloaded else "already here",
            result.seconds,
        )
        return result
