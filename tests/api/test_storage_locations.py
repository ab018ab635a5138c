"""Where a resource's versions go, and where a Ready Checkpoint's version is fetched from."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.resources import Storage
from api.storage import RemoteStorage, resource_storage, stored_at

CKPT = "96429b2725761a09"
DEFAULT = RemoteStorage(bucket="fleet-default", endpoint="http://minio:9000")


def test_a_resource_without_storage_uses_the_default() -> None:
    assert resource_storage(None, namespace="ns", default=DEFAULT) == DEFAULT
    assert resource_storage(None, namespace="ns", default=None) is None


def test_a_pvc_resource_keeps_versions_on_the_nodes_root() -> None:
    pvc = Storage.model_validate({"type": "pvc", "pvc": {"claimName": "ckpts"}})
    assert resource_storage(pvc, namespace="ns", default=DEFAULT) is None


def test_an_s3_resource_names_its_bucket_encryption_and_secret_in_its_namespace() -> None:
    s3 = Storage.model_validate(
        {
            "type": "s3",
            "s3": {
                "bucket": "team-ckpts",
                "prefix": "llama",
                "region": "eu-west-1",
                "credentialsSecret": "s3-keys",
                "serverSideEncryption": "aws:kms",
                "kmsKeyID": "alias/ckpt",
            },
        }
    )
    found = resource_storage(s3, namespace="inference", default=DEFAULT)
    assert found == RemoteStorage(
        bucket="team-ckpts",
        prefix="llama",
        region="eu-west-1",
        sse="aws:kms",
        kms_key_id="alias/ckpt",
        credentials_secret="s3-keys",
        secret_namespace="inference",
    )


def test_stored_at_reads_bucket_and_prefix_from_the_uri() -> None:
    uri = f"s3://fleet-default/a/b/{CKPT}/versions/v1/"
    found = stored_at(uri, checkpoint_id=CKPT, version="v1", spec=DEFAULT)
    assert found == DEFAULT.model_copy(update={"prefix": "a/b"})
    other = stored_at(uri, checkpoint_id=CKPT, version="v1", spec=None)
    assert other == RemoteStorage(bucket="fleet-default", prefix="a/b")


def test_stored_at_reads_the_kind_of_store_from_the_scheme() -> None:
    uri = f"gs://fleet-default/a/{CKPT}/versions/v1/"
    found = stored_at(uri, checkpoint_id=CKPT, version="v1", spec=DEFAULT)
    assert found == RemoteStorage(kind="gs", bucket="fleet-default", prefix="a")  # not DEFAULT's
    assert found.uri == "gs://fleet-default/a/"
    assert RemoteStorage(bucket="b-x").uri == "s3://b-x/"  # requests without a kind are S3


@pytest.mark.parametrize(
    "uri",
    [
        f"/checkpoints/{CKPT}/versions/v1",
        f"file:///checkpoints/{CKPT}/versions/v1/",
        f"s3://b-x/{CKPT}/versions/v2/",
        "",
    ],
    ids=["filesystem", "file-uri", "other-version", "empty"],
)
def test_stored_at_is_none_off_s3_or_for_another_version(uri: str) -> None:
    assert stored_at(uri, checkpoint_id=CKPT, version="v1", spec=None) is None


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bucket", "UPPER", "String should match pattern"),
        ("kind", "S3", "String should match pattern"),
        ("prefix", "a b", "String should match pattern"),
        ("sse", "rot13", "Input should be '', 'AES256' or 'aws:kms'"),
    ],
)
def test_a_bad_location_is_refused_naming_the_field(field: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        RemoteStorage.model_validate({"bucket": "ok-bucket", field: value})
    assert err.value.errors()[0]["loc"] == (field,)
    assert message in str(err.value)
