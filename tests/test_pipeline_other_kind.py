"""Another kind of remote store, registered by the test (the filesystem backend under the
name `shelf`), flows through every consumer of the storage seam as S3 does: a capture
publishes to it, a node without the version restores from it through its cache, prefetch
warms a cache from it, the catalog lists and describes it, retention lists and deletes in
it. Nothing above the backends looks at a location's scheme."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.client import Client

from activities.host.processes import terminate
from activities.storage.backends import KindContext, register, unregister
from activities.storage.objectstore import Backend
from activities.storage.objectstore.filesystem import FilesystemBackend
from activities.storage.objectstore.transfer import TransferSettings
from activities.storage.remote import RemoteStores
from activities.storage.remote_catalog import RemoteCatalog
from activities.storage.retention import RemoteVersions
from activities.storage.store import CheckpointStore
from api.reasons import Reason
from api.storage import RemoteStorage
from tests.checkpoint_trees import CKPT, VERSION, committed_version, fetched, tree_files
from tests.conftest import needs_criu
from tests.pipeline import capture, capture_request, get_json, restore, sample_workload
from workers.operations import prefetch
from workers.ports import free_port
from workers.settings import Settings
from workflows.contracts import PrefetchRequest


class Shelf:
    """The `shelf` kind: versions under `<endpoint>/<bucket>/<prefix>/`, in the store layout."""

    def __init__(self, context: KindContext) -> None:
        self._transfer = context.transfer

    def open(self, storage: RemoteStorage) -> FilesystemBackend:
        root = Path(storage.endpoint) / storage.bucket / storage.prefix
        return FilesystemBackend(root=root, settings=self._transfer)


@pytest.fixture
def shelf(tmp_path: Path) -> Iterator[RemoteStorage]:
    register("shelf", Shelf)
    try:
        yield RemoteStorage(kind="shelf", bucket="ckpts", prefix="fleet", endpoint=str(tmp_path))
    finally:
        unregister("shelf")


def _backend(storage: RemoteStorage) -> Backend:
    return RemoteStores(transfer=TransferSettings()).backend(storage)


async def test_prefetch_catalog_and_retention_read_another_kind(
    client: Client, workers: Settings, shelf: RemoteStorage, tmp_path: Path
) -> None:
    backend = _backend(shelf)
    files = tree_files()
    local = committed_version(tmp_path / "elsewhere", files)
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert (tmp_path / "ckpts" / "fleet" / CKPT / "versions" / VERSION / "manifest.json").is_file()

    catalog = RemoteCatalog(backend)
    entry = catalog.find(CKPT)
    assert (entry.version, entry.location) == (VERSION, backend.uri(CKPT, VERSION))
    assert (
        catalog.manifest(entry).files
        == CheckpointStore(local.parents[2]).verify(local, checkpoint_id=CKPT).files
    )

    request = PrefetchRequest(
        checkpoint_id=CKPT,
        storage=shelf,
        nodes=[workers.node.name],
        control_task_queue=workers.node.control_task_queue,
    )
    [node] = (await prefetch(client, request)).nodes
    assert node.error == "" and node.result is not None
    assert node.result.downloaded and node.result.version == VERSION
    cached = fetched(workers.home / "cache" / "checkpoints").find(CKPT, VERSION)
    assert {p: (cached / p).read_bytes() for p in files} == files
    missing = request.model_copy(update={"checkpoint_id": "0" * 16})
    [lost] = (await prefetch(client, missing)).nodes
    assert lost.error == (
        f"{Reason.CHECKPOINT_NOT_FOUND}: no committed checkpoint {'0' * 16} in shelf://ckpts/fleet/"
    )

    remote = RemoteVersions(backend)
    [listed] = remote.versions()
    assert (listed.checkpoint_id, listed.version, listed.namespace) == (CKPT, VERSION, "local")
    assert remote.delete(CKPT, VERSION) and not remote.delete(CKPT, VERSION)
    assert catalog.checkpoints() == [] and remote.versions() == []


@needs_criu
async def test_capture_publishes_to_another_kind_and_a_node_without_it_restores_from_it(
    client: Client, workers: Settings, shelf: RemoteStorage, tmp_path: Path
) -> None:
    port = free_port()
    request = capture_request(workers, sample_workload("shelved", port))
    result = await capture(client, request.model_copy(update={"storage": shelf}))
    ckpt, backend = result.checkpoint_id, _backend(shelf)
    assert "upload" in result.step_seconds
    assert result.storage_uri == backend.uri(ckpt, result.version)
    assert backend.list_versions(ckpt) == [result.version]

    # This node now acts as one that never had it: only the shelf holds the version.
    store = CheckpointStore(workers.checkpoint_root)
    log = (store.find(ckpt) / "workload-output.log").read_text()
    instance = re.search(r"instance ([0-9a-f]{32})", log)
    assert instance, log
    shutil.rmtree(store.checkpoint_dir(ckpt))

    restored = await restore(client, workers, "shelved", ckpt, storage=shelf)
    try:
        assert get_json(f"http://127.0.0.1:{port}/info")["instance_id"] == instance.group(1)
        assert "fetch" in restored.stage_seconds
        assert restored.version == result.version
    finally:
        assert await terminate(restored.pid, grace_seconds=5)
    cached = fetched(workers.home / "cache" / "checkpoints")
    assert cached.find(ckpt).name == result.version
