"""zstd per file in the S3 backend, against a real S3-protocol server (moto's): what is
compressed and what is not, byte-exact round trips, resumed compressed multipart uploads,
and damaged or doubled compressed objects refused by name."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import zstandard

from activities.storage.chunks import table_path
from activities.storage.objectstore.compression import worth_compressing
from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.objectstore.s3calls import client_config
from activities.storage.objectstore.transfer import TransferProgress, TransferSettings
from activities.storage.store import CheckpointStore
from api.errors import DigestMismatchError
from tests.checkpoint_trees import CKPT, VERSION, MiB, committed_version, final_names
from tests.s3server import new_bucket, s3_client

SETTINGS = TransferSettings(part_size=5 * MiB, concurrency=4, durable=False)
PREFIX = "team-a/checkpoints"
HEX = "criu/pages-1.img"  # compresses to about half: three 5 MiB parts
TEXT = "criu/pages-2.img"  # compresses to far less than one part
SMALL_TEXT = "criu/pages-3.img"  # under one part before compression
RANDOM = "criu/pages-4.img"  # incompressible, multipart
SMALL_RANDOM = "criu/mm-1.img"  # incompressible, one PUT


def _hex(size: int, *, seed: int) -> bytes:
    return random.Random(seed).randbytes(size // 2).hex().encode()


def _text(size: int) -> bytes:
    lines = b"".join(b"%08d pages of a model that compress well\n" % i for i in range(10_000))
    return (lines * (size // len(lines) + 1))[:size]


def _random(size: int, *, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _files() -> dict[str, bytes]:
    return {
        HEX: _hex(24 * MiB, seed=1),
        TEXT: _text(12 * MiB + 3),
        SMALL_TEXT: _text(3 * MiB),
        RANDOM: _random(6 * MiB + 5, seed=2),
        SMALL_RANDOM: _random(2 * MiB, seed=3),
        "criu/core-1.img": b"core" * 100,  # too small to be worth a try
        "criu/empty.img": b"",
    }


COMPRESSED = {HEX, TEXT, SMALL_TEXT}


@pytest.fixture
def client(s3_endpoint: str) -> Any:
    return s3_client(s3_endpoint, config=client_config(SETTINGS))


@pytest.fixture
def bucket(client: Any) -> str:
    return new_bucket(client)


def _backend(client: Any, bucket: str, settings: TransferSettings = SETTINGS) -> S3Backend:
    return S3Backend(client=client, location=S3Location(bucket, PREFIX), settings=settings)


@pytest.fixture
def backend(client: Any, bucket: str) -> S3Backend:
    return _backend(client, bucket)


def _key(path: str) -> str:
    return f"{PREFIX}/{CKPT}/versions/{VERSION}/{path}"


def _objects(client: Any, bucket: str) -> dict[str, int]:
    """The objects of the checkpoint's versions (not the index's)."""
    listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/{CKPT}/").get("Contents", [])
    return {str(item["Key"]): int(item["Size"]) for item in listed}


def _dest(tmp_path: Path) -> Path:
    return CheckpointStore(tmp_path / "cache").version_dir(CKPT, VERSION)


def _fetch_and_check(backend: S3Backend, tmp_path: Path, files: dict[str, bytes]) -> int:
    """Download into a fresh cache, check every byte; returns the bytes transferred."""
    dest = _dest(tmp_path)
    got = backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=dest)
    assert CheckpointStore(tmp_path / "cache").verify(dest, checkpoint_id=CKPT) == got.manifest
    for path, data in files.items():
        assert (dest / path).read_bytes() == data, path
    return got.bytes_transferred


def test_only_samples_that_compress_well_are_worth_it() -> None:
    assert worth_compressing(_text(4 * MiB))
    assert worth_compressing(_hex(4 * MiB, seed=1))
    assert not worth_compressing(_random(4 * MiB, seed=1))
    assert not worth_compressing(b"")


def test_compressible_files_are_stored_as_zst_and_round_trip(
    backend: S3Backend, client: Any, bucket: str, tmp_path: Path
) -> None:
    files = _files()
    local = committed_version(tmp_path / "node", files)
    seen: list[TransferProgress] = []
    sent = backend.upload_version(local, checkpoint_id=CKPT, version=VERSION, progress=seen.append)

    stored = _objects(client, bucket)
    digests = {entry.path: entry.sha256 for entry in sent.manifest.files}
    expected = {_key(p + ".zst" if p in COMPRESSED else p) for p in [*files, "manifest.json"]}
    assert set(stored) == expected
    for path in COMPRESSED:
        assert stored[_key(path + ".zst")] < len(files[path])
        head = client.head_object(Bucket=bucket, Key=_key(path + ".zst"))
        assert head["Metadata"]["sha256"] == digests[path]  # the plain bytes'
    assert stored[_key(HEX + ".zst")] > 2 * SETTINGS.part_size  # a multipart upload of 3 parts
    assert client.head_object(Bucket=bucket, Key=_key(HEX + ".zst"))["ETag"].endswith('-3"')
    assert stored[_key(RANDOM)] == len(files[RANDOM])

    total = sum(map(len, files.values()))
    assert sent.bytes_total == total == seen[-1].bytes_done
    assert sent.bytes_transferred == sum(
        size for key, size in stored.items() if "manifest" not in key
    )
    assert sent.bytes_transferred < total
    assert _fetch_and_check(backend, tmp_path, files) == sent.bytes_transferred


def test_page_images_stay_plain_where_restores_stream_them(
    client: Any, bucket: str, tmp_path: Path
) -> None:
    """With streamed restores on (decision 0039) a page image that has a chunk table is
    stored plain however well it compresses; other files are compressed as before."""
    files = {TEXT: _text(12 * MiB), SMALL_TEXT: _text(3 * MiB)}  # 12 MiB: a chunk table
    local = committed_version(tmp_path / "node", files)
    streamable = TransferSettings(part_size=5 * MiB, streamable=True)
    backend = _backend(client, bucket, streamable)
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert set(_objects(client, bucket)) == {
        _key(TEXT),  # plain: a restore reads it by range
        _key(table_path(TEXT)),
        _key(SMALL_TEXT + ".zst"),  # too small for a table: fetched whole, compressed
        _key("manifest.json"),
    }
    _fetch_and_check(backend, tmp_path, files)


def test_off_stores_every_file_as_it_is(client: Any, bucket: str, tmp_path: Path) -> None:
    files = _files()
    local = committed_version(tmp_path / "node", files)
    backend = _backend(client, bucket, TransferSettings(part_size=5 * MiB, compression="off"))
    sent = backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert set(_objects(client, bucket)) == {_key(p) for p in [*files, "manifest.json"]}
    assert sent.bytes_transferred == sent.bytes_total
    _fetch_and_check(backend, tmp_path, files)


def test_a_file_whose_compressed_name_is_taken_stays_plain(
    backend: S3Backend, client: Any, bucket: str, tmp_path: Path
) -> None:
    files = {TEXT: _text(2 * MiB), TEXT + ".zst": _text(2 * MiB + 1)}
    local = committed_version(tmp_path / "node", files)
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert set(_objects(client, bucket)) == {
        _key(TEXT),
        _key(TEXT + ".zst.zst"),
        _key("manifest.json"),
    }
    _fetch_and_check(backend, tmp_path, files)


class _Interrupted(Exception):
    pass


class _PartsSent:
    """Part numbers of every upload_part the client sends; from `refuse_from` on, each is
    refused before it leaves (as by a crash), so what is stored is known exactly."""

    def __init__(self, client: Any) -> None:
        self.numbers: list[int] = []
        self.refuse_from: int | None = None
        client.meta.events.register("before-parameter-build.s3.UploadPart", self._note)

    def _note(self, params: dict[str, Any], **_: Any) -> None:
        number = int(params["PartNumber"])
        if self.refuse_from is not None and number >= self.refuse_from:
            raise _Interrupted
        self.numbers.append(number)


def test_an_interrupted_compressed_upload_resumes_from_the_stored_parts(
    backend: S3Backend, client: Any, bucket: str, tmp_path: Path
) -> None:
    files = {HEX: _hex(24 * MiB, seed=4)}
    local = committed_version(tmp_path / "node", files)
    sent = _PartsSent(client)
    sent.refuse_from = 2
    with pytest.raises(_Interrupted):
        backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert backend.list_versions(CKPT) == []
    [upload] = client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert upload["Key"] == _key(HEX + ".zst")
    listed = client.list_parts(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    assert [int(part["PartNumber"]) for part in listed["Parts"]] == [1]
    assert int(listed["Parts"][0]["Size"]) == SETTINGS.part_size

    sent.numbers.clear()
    sent.refuse_from = None
    seen: list[TransferProgress] = []
    report = backend.upload_version(
        local, checkpoint_id=CKPT, version=VERSION, progress=seen.append
    )
    assert sent.numbers == [2, 3]  # the stored part made again, found equal, not sent
    compressed = _objects(client, bucket)[_key(HEX + ".zst")]
    assert report.bytes_transferred == compressed - SETTINGS.part_size
    assert seen[-1].bytes_done == sum(map(len, files.values()))  # with its chunk table
    assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket)
    _fetch_and_check(backend, tmp_path, files)


def test_a_retry_keeps_a_complete_object_stored_the_other_way(
    backend: S3Backend, client: Any, bucket: str, tmp_path: Path
) -> None:
    files = {TEXT: _text(12 * MiB), SMALL_TEXT: _text(3 * MiB)}
    local = committed_version(tmp_path / "node", files)
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    client.delete_object(Bucket=bucket, Key=_key("manifest.json"))  # killed before the commit
    client.put_object(Bucket=bucket, Key=_key(TEXT), Body=b"stale")  # and a stray plain copy

    off = _backend(client, bucket, TransferSettings(part_size=5 * MiB, compression="off"))
    assert off.upload_version(local, checkpoint_id=CKPT, version=VERSION).bytes_transferred == 0
    assert set(_objects(client, bucket)) == {
        _key(TEXT + ".zst"),
        _key(table_path(TEXT)),  # its chunk table (decision 0039): digests, stored plain
        _key(SMALL_TEXT + ".zst"),
        _key("manifest.json"),
    }
    _fetch_and_check(off, tmp_path, files)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _rewrite(client: Any, bucket: str, key: str, change: Any) -> None:
    data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=change(bytearray(data)))


def _flipped(offset: int) -> Any:
    def flip(data: bytearray) -> bytes:
        data[offset] ^= 0xFF
        return bytes(data)

    return flip


# case: (the file, its object's new bytes from the old)
DAMAGE = {
    "flipped in a part": (HEX, _flipped(6 * MiB)),
    "flipped in the frame's end": (HEX, _flipped(-2)),
    "flipped, one GET": (SMALL_TEXT, _flipped(1000)),
    "truncated": (TEXT, lambda data: bytes(data[: len(data) // 2])),
    "not zstd": (SMALL_TEXT, lambda data: b"plain bytes" * 1000),
    "a valid frame of other bytes": (SMALL_TEXT, lambda data: _zstd(_text(3 * MiB)[::-1])),
    "a valid frame of more bytes": (TEXT, lambda data: _zstd(_text(100 * MiB))),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_compressed_object_is_refused_by_name(
    backend: S3Backend, client: Any, bucket: str, tmp_path: Path, damage: str
) -> None:
    files = {HEX: _hex(24 * MiB, seed=5), TEXT: _text(12 * MiB), SMALL_TEXT: _text(3 * MiB)}
    local = committed_version(tmp_path / "node", files)
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    path, change = DAMAGE[damage]
    _rewrite(client, bucket, _key(path + ".zst"), change)
    dest = _dest(tmp_path)
    with pytest.raises(DigestMismatchError, match=re.escape(f"s3://{bucket}/{_key(path)}.zst ")):
        backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=dest)
    landed = final_names(dest)
    assert path not in landed and "manifest.json" not in landed
    assert not [name for name in landed if name.endswith(".partial")]


def test_a_file_stored_both_plain_and_compressed_is_refused_naming_both(
    backend: S3Backend, client: Any, bucket: str, tmp_path: Path
) -> None:
    local = committed_version(tmp_path / "node", {TEXT: _text(2 * MiB)})
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    client.put_object(Bucket=bucket, Key=_key(TEXT), Body=_text(2 * MiB))
    uri = f"s3://{bucket}/{_key(TEXT)}"
    with pytest.raises(DigestMismatchError, match=re.escape(f"{uri} and {uri}.zst both hold")):
        backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=_dest(tmp_path))


def test_an_unknown_zst_object_is_not_in_the_manifest(
    backend: S3Backend, client: Any, bucket: str, tmp_path: Path
) -> None:
    local = committed_version(tmp_path / "node", {TEXT: _text(2 * MiB)})
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    client.put_object(Bucket=bucket, Key=_key("criu/other.img.zst"), Body=b"x")
    with pytest.raises(DigestMismatchError, match=r"other\.img\.zst is not in the manifest"):
        backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=_dest(tmp_path))


def test_delete_and_sweep_cover_compressed_objects_and_uploads(
    backend: S3Backend, client: Any, bucket: str, tmp_path: Path
) -> None:
    local = committed_version(tmp_path / "node", {HEX: _hex(24 * MiB, seed=6)})
    sent = _PartsSent(client)
    sent.refuse_from = 2
    with pytest.raises(_Interrupted):
        backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    stale = f"s3://{bucket}/{_key(HEX + '.zst')}"
    assert backend.sweep_incomplete(older_than_seconds=0, dry_run=False) == [stale]

    sent.refuse_from = None
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert _key(HEX + ".zst") in _objects(client, bucket)
    backend.delete_version(checkpoint_id=CKPT, version=VERSION)
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)
    assert backend.list_versions(CKPT) == []
