"""Streamed restore (decision 0039) of real processes with real CRIU from a real S3 server:
CRIU starts before the page images are fetched; a page source serves them to the lazy-pages
daemon on fault and fetches the rest in the background, each chunk checked first."""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.contracts import RestoredWorkload, RestoreInput
from activities.criu.command import IMAGES_DIR, Criu
from activities.criu.lazy import LazyPages
from activities.criu.pagemap import read_pagemaps, restore_reads
from activities.host.layout import NodeLayout
from activities.host.processes import is_alive, terminate
from activities.local.restore import RestoreActivities
from activities.storage.chunks import CHUNK_SIZE, ChunkTable, table_path
from activities.storage.objectstore.cache import NodeCache
from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.objectstore.s3calls import client_config
from activities.storage.objectstore.transfer import TransferSettings
from activities.storage.remote import RemoteStores
from activities.storage.sources import CheckpointSource
from activities.storage.store import CheckpointStore
from activities.storage.streaming import PageStreams
from api.errors import DigestMismatchError
from api.storage import RemoteStorage
from api.workload import Readiness
from tests.activities.test_lazy_restore import LAZY_SKIP
from tests.checkpoint_trees import fetched
from tests.pipeline import capture, capture_request, shell_workload
from tests.s3server import ACCESS_KEY, REGION, SECRET_KEY, new_bucket, s3_client
from tests.waiting import wait_until
from workers.ports import free_port
from workers.settings import CriuSettings, Settings

pytestmark = [
    pytest.mark.skipif(LAZY_SKIP is not None, reason=LAZY_SKIP or ""),
    pytest.mark.timeout(180),
]

PROGRAM = Path(__file__).parents[1] / "programs" / "memory_server.py"
MIB = 48
SEED = 4402
RANDOM = random.Random(SEED)
MEMORY = b"".join(RANDOM.randbytes(1 << 20) for _ in range(MIB))  # as the program fills it
FEW = " ".join(str(MEMORY[(len(MEMORY) - 1) * i // 15]) for i in range(16))
DIGEST = hashlib.sha256(MEMORY).hexdigest()
PREFIX = "streamed"


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # The node's credentials come from boto3's standard chain, as on a real node.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    yield


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def _criu() -> Criu:
    path = CriuSettings().resolve()
    assert path is not None
    return Criu(path)


class Published(NamedTuple):
    checkpoint_id: str
    version: str
    port: int
    storage: RemoteStorage
    backend: S3Backend
    image_size: int  # of its page image


async def _published(client: Client, settings: Settings, s3_endpoint: str, name: str) -> Published:
    """A real process holding MIB of seeded memory, captured here, uploaded (stored plain),
    and gone from this node: only the bucket has it."""
    port = free_port()
    script = f"exec {sys.executable} {PROGRAM} {port} {MIB} {SEED}"
    readiness = Readiness(kind="http", http_url=f"http://127.0.0.1:{port}/")
    result = await capture(
        client, capture_request(settings, shell_workload(name, script, readiness=readiness))
    )
    s3 = s3_client(s3_endpoint)
    bucket = new_bucket(s3)
    transfer = TransferSettings(part_size=5 << 20, concurrency=4, compression="off")
    backend = S3Backend(
        client=s3_client(s3_endpoint, config=client_config(transfer)),
        location=S3Location(bucket, PREFIX),
        settings=transfer,
    )
    store = CheckpointStore(NodeLayout(settings.home).checkpoints)
    backend.upload_version(
        store.find(result.checkpoint_id), checkpoint_id=result.checkpoint_id, version=result.version
    )
    image_size = (store.find(result.checkpoint_id) / IMAGES_DIR / "pages-1.img").stat().st_size
    shutil.rmtree(store.checkpoint_dir(result.checkpoint_id))
    storage = RemoteStorage(
        kind="s3", bucket=bucket, prefix=PREFIX, endpoint=s3_endpoint, region=REGION
    )
    return Published(result.checkpoint_id, result.version, port, storage, backend, image_size)


def _activities(settings: Settings, lazy: LazyPages, streams: PageStreams) -> RestoreActivities:
    layout = NodeLayout(settings.home)
    store = CheckpointStore(layout.checkpoints)
    source = CheckpointSource(
        store=store,
        cache=NodeCache(settings.home / "streamed-cache"),  # not the node worker's
        remote=RemoteStores(transfer=TransferSettings()),
    )
    return RestoreActivities(
        criu=_criu(),
        store=store,
        layout=layout,
        source=source,
        lazy_pages=lazy,
        streams=streams,
    )


async def _restore(
    acts: RestoreActivities, name: str, ckpt: str, storage: RemoteStorage
) -> RestoredWorkload:
    request = RestoreInput(
        checkpoint_id=ckpt, name=name, storage=storage, answer_timeout_seconds=30
    )
    return await ActivityEnvironment().run(acts.restore_checkpoint, request)


async def test_a_streamed_restore_answers_before_its_pages_are_here_and_ends_whole(
    client: Client, workers: Settings, s3_endpoint: str, keys: None
) -> None:
    ckpt, _version, port, storage, _backend, size = await _published(
        client, workers, s3_endpoint, "streamed"
    )
    lazy = LazyPages(criu=_criu(), enabled=True)
    # No fill of our own: every chunk is fetched when the daemon asks for one of its pages
    # (on a fault, or its own background requests once the process runs).
    streams = PageStreams(enabled=True, background=False)
    restored = await _restore(_activities(workers, lazy, streams), "streamed", ckpt, storage)
    try:
        assert list(restored.stage_seconds) == [
            "stream",
            "prepare",
            "lazy-pages",
            "criu-restore",
            "await-answer",
        ]
        assert restored.page_source_pid > 0 and restored.lazy_pages_pid > 0
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/") == FEW
        assert restored.stream_unavailable == ""
        # Reading all its memory brings every page (the daemon's background requests too).
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
        await lazy.wait_idle(timeout=120)
        outcome = lazy.outcomes[restored.lazy_pages_pid]
        assert outcome.returncode == 0 and outcome.transferred == outcome.total > 0
        assert outcome.faults > 0
        assert not is_alive(restored.page_source_pid)
        status = streams.outcomes[restored.page_source_pid]
        assert status["complete"] and not status["failed"]
        # Every chunk came as the daemon asked: none by a fill of our own, which was off.
        assert status["background"] == 0 and status["on_demand"] == status["chunks"] > 0
        assert status["requests"] > 0
        assert status["bytes"] == size  # each byte fetched once
        assert not list((workers.home / "restores" / "streamed").iterdir())  # work dir gone
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
    finally:
        assert await terminate(restored.pid, grace_seconds=5)


async def test_a_streamed_restore_fills_in_the_background_until_every_page_is_here(
    client: Client, workers: Settings, s3_endpoint: str, keys: None
) -> None:
    ckpt, _version, port, storage, _backend, size = await _published(
        client, workers, s3_endpoint, "filled"
    )
    lazy = LazyPages(criu=_criu(), enabled=True)
    streams = PageStreams(enabled=True)
    restored = await _restore(_activities(workers, lazy, streams), "filled", ckpt, storage)
    try:
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/") == FEW
        # Nobody reads the rest of its memory: it arrives anyway, and both helpers end.
        await lazy.wait_idle(timeout=120)
        status = streams.outcomes[restored.page_source_pid]
        assert status["complete"] and not status["failed"]
        assert status["background"] > 0
        assert status["background"] + status["on_demand"] == status["chunks"]
        assert status["bytes"] == size  # each byte fetched once
        assert lazy.outcomes[restored.lazy_pages_pid].returncode == 0
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
    finally:
        assert await terminate(restored.pid, grace_seconds=5)
    # The complete copy joined the node cache: whole and as committed (every file hashed
    # again here, with no record of earlier checks), and the next restore reads it there.
    cached = fetched(workers.home / "streamed-cache")
    cached.verify(cached.find(ckpt), checkpoint_id=ckpt)
    again = await _restore(_activities(workers, lazy, streams), "filled", ckpt, storage)
    try:
        assert "stream" not in again.stage_seconds and "fetch" not in again.stage_seconds
        assert again.stream_unavailable == "" and again.page_source_pid == 0
        assert await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest") == DIGEST
    finally:
        assert await terminate(again.pid, grace_seconds=5)


def _damage(backend: S3Backend, ckpt: str, version: str, tmp: Path, *, at: int | None) -> int:
    """Change one byte of the version's page image in the bucket (its chunk table as it was):
    the byte of the page holding MEMORY[at], or (None) the first page CRIU reads itself.
    Returns its offset in the page image."""
    bucket, prefix = backend.location.bucket, backend.location.key(ckpt, version, IMAGES_DIR)
    key = f"{prefix}/pages-1.img"
    image = bytearray(backend.client.get_object(Bucket=bucket, Key=key)["Body"].read())
    if at is None:
        tmp.mkdir()
        listed = backend.client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]
        for item in listed:
            if "/pagemap-" in item["Key"]:
                body = backend.client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
                (tmp / Path(item["Key"]).name).write_bytes(body)
        offset = restore_reads(read_pagemaps(tmp))["pages-1.img"][0][0]
    else:
        offset = image.find(MEMORY[at : at + 64])
        assert offset >= 0
    image[offset] ^= 0xFF
    backend.client.put_object(Bucket=bucket, Key=key, Body=bytes(image))
    return offset


async def test_a_damaged_range_is_never_served_and_its_process_is_killed(
    client: Client, workers: Settings, s3_endpoint: str, keys: None, tmp_path: Path
) -> None:
    ckpt, version, port, storage, backend, _size = await _published(
        client, workers, s3_endpoint, "damaged"
    )
    # A chunk of memory the first answer does not read: its 16 bytes lie 3.2 MiB apart.
    offset = _damage(backend, ckpt, version, tmp_path / "pagemaps", at=(MIB << 20) // 30)
    refused = f"(chunk {offset // CHUNK_SIZE}) do not match their SHA-256 digest"
    lazy = LazyPages(criu=_criu(), enabled=True)
    streams = PageStreams(enabled=True)
    try:
        restored = await _restore(_activities(workers, lazy, streams), "damaged", ckpt, storage)
    except DigestMismatchError as err:
        # The daemon asked for the chunk (it fetches every page once the process runs)
        # before the first answer: the restore fails, naming it, and stops the process.
        assert refused in str(err)
    else:
        # The process answered first: the chunk is refused once asked for, and the page
        # source kills the process rather than let it read anything in its place.
        await wait_until(lambda: not is_alive(restored.pid), timeout=30)
        await lazy.wait_idle(timeout=60)
        status = streams.outcomes[restored.page_source_pid]
        assert not status["complete"]
        assert status["failed"].startswith("DigestMismatch: ") and refused in status["failed"]
    with pytest.raises(OSError):  # nothing answers with whatever it read
        await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/digest")
    assert lazy.running == {}
    # The workload's control directory says why (a standby there would start cold).
    (failed,) = workers.home.rglob("restore-failed")
    assert "DigestMismatch" in failed.read_text() and refused in failed.read_text()


async def test_a_damaged_page_criu_reads_itself_fails_the_restore_before_criu(
    client: Client, workers: Settings, s3_endpoint: str, keys: None, tmp_path: Path
) -> None:
    ckpt, version, _port, storage, backend, _size = await _published(
        client, workers, s3_endpoint, "early"
    )
    _damage(backend, ckpt, version, tmp_path / "pagemaps", at=None)
    lazy = LazyPages(criu=_criu(), enabled=True)
    streams = PageStreams(enabled=True)
    with pytest.raises(Exception) as failure:
        await _restore(_activities(workers, lazy, streams), "early", ckpt, storage)
    assert "DigestMismatch" in repr(failure.value) or "SHA-256" in str(failure.value)
    assert lazy.running == {} and lazy.outcomes == {}  # CRIU never started
    assert not (workers.home / "restores" / "early").exists() or not any(
        (workers.home / "restores" / "early").rglob("pages-1.img")
    )


def test_a_chunk_table_refuses_a_changed_chunk_and_a_damaged_table(tmp_path: Path) -> None:
    from activities.storage.chunks import digest_with_table
    from api.errors import DigestMismatchError

    data = random.Random(7).randbytes(2 * CHUNK_SIZE + 123)
    path = tmp_path / "pages-1.img"
    path.write_bytes(data)
    digest, table = digest_with_table(path)
    assert digest == hashlib.sha256(data).hexdigest()
    assert table.chunks == 3 and table.span(2) == (2 * CHUNK_SIZE, 123)
    assert list(table.covering(CHUNK_SIZE - 1, 2)) == [0, 1]
    decoded = ChunkTable.decode(table.encode(), where="t")
    decoded.check(1, data[CHUNK_SIZE : 2 * CHUNK_SIZE], where="t")
    changed = bytearray(data[CHUNK_SIZE : 2 * CHUNK_SIZE])
    changed[5] ^= 1
    with pytest.raises(DigestMismatchError, match=r"bytes 1048576-2097151 \(chunk 1\)"):
        decoded.check(1, changed, where="t")
    with pytest.raises(DigestMismatchError, match=r"cut short|holds"):
        ChunkTable.decode(table.encode()[:-1], where="t")
    assert table_path("criu/pages-1.img") == "chunks/criu/pages-1.img.sha256"


def test_a_commit_writes_the_chunk_table_of_each_large_page_image(tmp_path: Path) -> None:
    from activities.storage.chunks import MIN_TABLE_SIZE
    from activities.storage.store import digest_tree

    large = random.Random(3).randbytes(MIN_TABLE_SIZE + 5)
    (tmp_path / "criu").mkdir()
    (tmp_path / "criu" / "pages-1.img").write_bytes(large)
    (tmp_path / "criu" / "pages-2.img").write_bytes(b"small" * 100)  # fetched whole
    (tmp_path / "criu" / "core-1.img").write_bytes(large)  # not a page image
    listed = {entry.path: entry for entry in digest_tree(tmp_path)}
    assert sorted(listed) == [
        "chunks/criu/pages-1.img.sha256",
        "criu/core-1.img",
        "criu/pages-1.img",
        "criu/pages-2.img",
    ]
    table = ChunkTable.read(tmp_path / "chunks/criu/pages-1.img.sha256")
    assert table.size == len(large) and table.chunks == MIN_TABLE_SIZE // CHUNK_SIZE + 1
    table.check(table.chunks - 1, large[-5:], where="pages-1.img")
    assert listed["criu/pages-1.img"].sha256 == hashlib.sha256(large).hexdigest()
