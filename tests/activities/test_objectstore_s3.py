"""The S3 backend against a real S3-protocol server (moto's, started here): layout,
manifest-last commit, digests, resumed uploads, damaged objects, bucket and credentials."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config

from activities.storage.objectstore.s3 import S3Backend, S3Location
from activities.storage.objectstore.s3calls import client_config
from activities.storage.objectstore.transfer import TransferProgress, TransferSettings
from activities.storage.store import CheckpointStore
from api.errors import (
    CheckpointNotFoundError,
    DigestMismatchError,
    InvalidNameError,
    StorageError,
    UnavailableError,
)
from tests.checkpoint_trees import (
    CKPT,
    LARGE,
    OTHER_CKPT,
    VERSION,
    MiB,
    committed_version,
    final_names,
    tree_files,
)
from tests.s3server import new_bucket, s3_client

SETTINGS = TransferSettings(part_size=5 * MiB, concurrency=4, sse="AES256")
PREFIX = "team-a/checkpoints"


@pytest.fixture
def endpoint(s3_endpoint: str) -> str:
    return s3_endpoint


def _client(endpoint: str, *, key: str = "testing", config: Config | None = None) -> Any:
    return s3_client(endpoint, key=key, config=config or client_config(SETTINGS))


@pytest.fixture
def client(endpoint: str) -> Any:
    return _client(endpoint)


@pytest.fixture
def bucket(client: Any) -> str:
    return new_bucket(client)


@pytest.fixture
def backend(client: Any, bucket: str) -> S3Backend:
    return S3Backend(client=client, location=S3Location(bucket, PREFIX), settings=SETTINGS)


@pytest.fixture
def files() -> dict[str, bytes]:
    return tree_files()


@pytest.fixture
def local(tmp_path: Path, files: dict[str, bytes]) -> Path:
    return committed_version(tmp_path / "node", files)


def _key(path: str) -> str:
    return f"{PREFIX}/{CKPT}/versions/{VERSION}/{path}"


def _dest(tmp_path: Path) -> Path:
    return CheckpointStore(tmp_path / "cache").version_dir(CKPT, VERSION)


def test_round_trip_keeps_layout_digests_and_commit(
    backend: S3Backend,
    client: Any,
    bucket: str,
    local: Path,
    files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    sent = backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert sent.bytes_transferred == sent.bytes_total == sum(map(len, files.values()))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    [indexed] = keys - {_key(path) for path in [*files, "manifest.json"]}
    assert indexed.startswith(f"{PREFIX}/index/{CKPT}/{VERSION}/")  # the index's object
    assert client.head_object(Bucket=bucket, Key=indexed)["ContentLength"] == 0
    head = client.head_object(Bucket=bucket, Key=_key(LARGE))
    assert head["ServerSideEncryption"] == "AES256"
    assert backend.list_versions(CKPT) == [VERSION]

    dest = _dest(tmp_path)
    got = backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=dest)
    assert got.bytes_transferred == sent.bytes_total
    assert CheckpointStore(tmp_path / "cache").verify(dest, checkpoint_id=CKPT) == got.manifest
    assert (dest / "manifest.json").read_bytes() == (local / "manifest.json").read_bytes()
    for path, data in files.items():
        assert (dest / path).read_bytes() == data


def test_retries_after_the_commit_move_no_bytes(
    backend: S3Backend, local: Path, tmp_path: Path
) -> None:
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    assert backend.upload_version(local, checkpoint_id=CKPT, version=VERSION).bytes_transferred == 0
    dest = _dest(tmp_path)
    backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=dest)
    again = backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=dest)
    assert again.bytes_transferred == 0


class _Interrupted(Exception):
    pass


def test_an_interrupted_upload_resumes_from_the_stored_parts(
    backend: S3Backend,
    client: Any,
    bucket: str,
    local: Path,
    files: dict[str, bytes],
    tmp_path: Path,
) -> None:
    def die_after_first_part(progress: TransferProgress) -> None:
        if progress.bytes_transferred >= SETTINGS.part_size:
            raise _Interrupted

    with pytest.raises(_Interrupted):
        backend.upload_version(
            local, checkpoint_id=CKPT, version=VERSION, progress=die_after_first_part
        )
    assert backend.list_versions(CKPT) == []  # no manifest: the version does not exist
    uploads = client.list_multipart_uploads(Bucket=bucket)["Uploads"]
    assert [u["Key"] for u in uploads] == [_key(LARGE)]

    seen: list[TransferProgress] = []
    report = backend.upload_version(
        local, checkpoint_id=CKPT, version=VERSION, progress=seen.append
    )
    total = sum(map(len, files.values()))
    assert report.bytes_transferred <= total - SETTINGS.part_size
    assert seen[-1].bytes_done == total and seen[-1].rate >= 0
    assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket)
    dest = _dest(tmp_path)
    backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=dest)
    assert (dest / LARGE).read_bytes() == files[LARGE]


def test_a_local_file_changed_after_its_commit_is_not_uploaded(
    backend: S3Backend, client: Any, bucket: str, local: Path
) -> None:
    pages = local / LARGE
    data = bytearray(pages.read_bytes())
    data[3 * MiB] ^= 1
    pages.write_bytes(bytes(data))
    with pytest.raises(DigestMismatchError, match=f"{LARGE} .*does not match its SHA-256"):
        backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert _key(LARGE) not in keys and _key("manifest.json") not in keys
    assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket)


def _flip(client: Any, bucket: str, path: str, offset: int) -> None:
    data = bytearray(client.get_object(Bucket=bucket, Key=_key(path))["Body"].read())
    data[offset] ^= 0xFF
    client.put_object(Bucket=bucket, Key=_key(path), Body=bytes(data))


def _truncate(client: Any, bucket: str, path: str) -> None:
    data = client.get_object(Bucket=bucket, Key=_key(path))["Body"].read()
    client.put_object(Bucket=bucket, Key=_key(path), Body=data[:-1])


def _rewrite_manifest(client: Any, bucket: str, change: Any) -> None:
    document = json.loads(
        client.get_object(Bucket=bucket, Key=_key("manifest.json"))["Body"].read()
    )
    change(document)
    client.put_object(Bucket=bucket, Key=_key("manifest.json"), Body=json.dumps(document).encode())


# case: (damage, error, message, the file that must not land under its name)
DAMAGE = {
    "flipped large": (
        lambda c, b: _flip(c, b, LARGE, 5 * MiB + 100),
        DigestMismatchError,
        f"{_key(LARGE)} does not match its SHA-256",
        LARGE,
    ),
    "flipped small": (
        lambda c, b: _flip(c, b, "criu/mm-1.img", 5),
        DigestMismatchError,
        f"{_key('criu/mm-1.img')} does not match its SHA-256",
        "criu/mm-1.img",
    ),
    "truncated": (
        lambda c, b: _truncate(c, b, LARGE),
        DigestMismatchError,
        f"{_key(LARGE)} has {5 * MiB + 12344} bytes, manifest says {5 * MiB + 12345}",
        LARGE,
    ),
    "missing": (
        lambda c, b: c.delete_object(Bucket=b, Key=_key("criu/core-1.img")),
        DigestMismatchError,
        f"{_key('criu/core-1.img')} is missing",
        None,
    ),
    "extra": (
        lambda c, b: c.put_object(Bucket=b, Key=_key("criu/extra.img"), Body=b"x"),
        DigestMismatchError,
        f"{_key('criu/extra.img')} is not in the manifest",
        None,
    ),
    "another checkpoint's manifest": (
        lambda c, b: _rewrite_manifest(c, b, lambda d: d.update(checkpoint_id=OTHER_CKPT)),
        DigestMismatchError,
        f"{_key('manifest.json')}: manifest is for checkpoint {OTHER_CKPT}, expected {CKPT}",
        None,
    ),
    "escaping path": (
        lambda c, b: _rewrite_manifest(c, b, lambda d: d["files"][0].update(path="../../x")),
        DigestMismatchError,
        f"{_key('manifest.json')} is not a valid manifest: .*must stay inside the version",
        None,
    ),
    "absolute path": (
        lambda c, b: _rewrite_manifest(c, b, lambda d: d["files"][0].update(path="/etc/passwd")),
        DigestMismatchError,
        "must stay inside the version",
        None,
    ),
    "no manifest": (
        lambda c, b: c.delete_object(Bucket=b, Key=_key("manifest.json")),
        CheckpointNotFoundError,
        f"{_key('manifest.json')} does not exist: checkpoint {CKPT} has no committed version",
        None,
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_objects_are_refused_by_name_and_nothing_unverified_lands(
    backend: S3Backend, client: Any, bucket: str, local: Path, tmp_path: Path, damage: str
) -> None:
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    change, error, message, damaged = DAMAGE[damage]
    change(client, bucket)
    dest = _dest(tmp_path)
    with pytest.raises(error, match=message.replace("[", r"\[")):
        backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=dest)
    landed = final_names(dest)
    assert "manifest.json" not in landed
    assert not [name for name in landed if name.endswith(".partial")]
    assert damaged not in landed
    assert CheckpointStore(tmp_path / "cache").versions(CKPT) == []


def test_a_version_without_its_manifest_is_not_listed(
    backend: S3Backend, client: Any, bucket: str, local: Path
) -> None:
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{CKPT}/versions/v2/criu/core-1.img", Body=b"")
    assert backend.list_versions(CKPT) == [VERSION]
    client.delete_object(Bucket=bucket, Key=_key("manifest.json"))
    assert backend.list_versions(CKPT) == []


def test_delete_and_stale_upload_sweep(
    backend: S3Backend, client: Any, bucket: str, local: Path
) -> None:
    backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    client.create_multipart_upload(Bucket=bucket, Key=f"{PREFIX}/{CKPT}/versions/v2/criu/x.img")
    # moto reports every upload as initiated on 2010-11-10, so only "stale" can be seen here.
    stale = f"s3://{bucket}/{PREFIX}/{CKPT}/versions/v2/criu/x.img"
    assert backend.sweep_incomplete(older_than_seconds=0, dry_run=True) == [stale]
    assert backend.sweep_incomplete(older_than_seconds=0, dry_run=False) == [stale]
    assert backend.sweep_incomplete(older_than_seconds=0, dry_run=True) == []
    assert backend.delete_version(checkpoint_id=CKPT, version=VERSION)
    assert backend.list_versions(CKPT) == [] and backend.listed() == []
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)
    assert not backend.delete_version(checkpoint_id=CKPT, version=VERSION)


def test_a_bucket_that_does_not_exist_is_named(client: Any, local: Path, tmp_path: Path) -> None:
    backend = S3Backend(client=client, location=S3Location("no-such-bucket"), settings=SETTINGS)
    with pytest.raises(StorageError, match="s3://no-such-bucket: bucket does not exist"):
        backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    with pytest.raises(StorageError, match="s3://no-such-bucket: bucket does not exist"):
        backend.list_versions(CKPT)
    with pytest.raises(StorageError, match="s3://no-such-bucket: bucket does not exist"):
        backend.download_version(checkpoint_id=CKPT, version=VERSION, dest_dir=_dest(tmp_path))


def _moto_auth(endpoint: str, initial_free_requests: str) -> None:
    """moto checks credentials against its IAM only after this many free requests."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=initial_free_requests.encode(),
        headers={"Content-Type": "text/plain"},  # a form body would hide it from moto
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def test_rejected_credentials_are_named(endpoint: str, bucket: str, local: Path) -> None:
    stranger = _client(endpoint, key="AKIAUNKNOWNKEY000000")
    backend = S3Backend(client=stranger, location=S3Location(bucket, PREFIX), settings=SETTINGS)
    _moto_auth(endpoint, "0")
    try:
        with pytest.raises(StorageError, match=f"s3://{bucket}/.*credentials rejected"):
            backend.upload_version(local, checkpoint_id=CKPT, version=VERSION)
    finally:
        _moto_auth(endpoint, "inf")


def test_an_unreachable_endpoint_is_unavailable(tmp_path: Path) -> None:
    from workers.ports import free_port

    config = Config(retries={"max_attempts": 1}, connect_timeout=2)
    client = _client(f"http://127.0.0.1:{free_port()}", config=config)
    backend = S3Backend(client=client, location=S3Location("b"), settings=SETTINGS)
    with pytest.raises(UnavailableError, match=r"s3://b/.*unreachable"):
        backend.list_versions(CKPT)


def test_location_keys_mirror_the_filesystem_layout() -> None:
    location = S3Location("b", "/team-a/checkpoints/")
    assert location.key(CKPT, VERSION, "criu/pages-1.img") == _key(LARGE)
    assert location.uri(location.key(CKPT, VERSION, "x")) == f"s3://b/{_key('x')}"
    with pytest.raises(InvalidNameError):
        S3Location("b", "team/../x")
    with pytest.raises(InvalidNameError):
        location.key(CKPT, "../v", "x")
