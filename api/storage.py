"""Where checkpoint versions are published beyond the node: an S3 location, as requests
carry it, and how a resource's `spec.storage` and `status.storageURI` map onto one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from api.contract import Contract
from api.resources import Storage


class RemoteStorage(Contract):
    """An S3 location (any S3-compatible endpoint) versions are published to beyond the
    node; without one, the node's checkpoint root (the PVC on a cluster) is the store.
    Credentials never travel in a request: the worker moving the bytes uses boto3's standard
    chain, or reads `credentials_secret` (keys `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    optionally `AWS_SESSION_TOKEN`) from `secret_namespace`."""

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_./-]*$")
    endpoint: str = ""
    region: str = ""
    sse: Literal["", "AES256", "aws:kms"] = ""
    kms_key_id: str = ""
    credentials_secret: str = ""
    secret_namespace: str = ""

    @property
    def uri(self) -> str:
        prefix = self.prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}/" if prefix else f"s3://{self.bucket}/"


def resource_storage(
    storage: Storage | None, *, namespace: str, default: RemoteStorage | None
) -> RemoteStorage | None:
    """Where a resource's captures go: its `spec.storage` (S3, or a PVC: the node's root),
    else the operator's default (None: the node's root)."""
    if storage is None:
        return default
    if storage.type == "pvc" or storage.s3 is None:
        return None
    s3 = storage.s3
    return RemoteStorage(
        bucket=s3.bucket,
        prefix=s3.prefix,
        endpoint=s3.endpoint,
        region=s3.region,
        sse=s3.server_side_encryption,
        kms_key_id=s3.kms_key_id,
        credentials_secret=s3.credentials_secret,
        secret_namespace=namespace if s3.credentials_secret else "",
    )


def stored_at(
    uri: str, *, checkpoint_id: str, version: str, spec: RemoteStorage | None
) -> RemoteStorage | None:
    """The S3 location a capture published a version to, from its `storageURI`
    (`s3://<bucket>/<prefix>/<id>/versions/<version>/`), with the endpoint, region,
    encryption and credentials of `spec` when it names that bucket. None: not in S3."""
    if not uri.startswith("s3://"):
        return None
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    tail = f"{checkpoint_id}/versions/{version}/"
    if not key.endswith(tail):
        return None
    prefix = key.removesuffix(tail).strip("/")
    if spec is not None and spec.bucket == bucket:
        return spec.model_copy(update={"prefix": prefix})
    return RemoteStorage(bucket=bucket, prefix=prefix)
