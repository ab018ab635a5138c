"""Where checkpoint versions are published beyond the node: a location in a remote object
store (S3 by default), as requests carry it, and how a resource's `spec.storage` and
`status.storageURI` map onto one."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from api.contract import Contract
from api.resources import Storage


class RemoteStorage(Contract):
    """A location in a remote store versions are published to beyond the node; without
    one, the node's checkpoint root (the PVC on a cluster) is the store.

    `kind` names the backend that serves it (`activities.storage.backends`; "s3", any
    S3-compatible endpoint, by default: requests recorded before there were kinds decode as
    S3); each kind reads the fields it needs and refuses what it cannot honour. Credentials
    never travel in a request: the worker moving the bytes uses its kind's standard chain
    (boto3's for S3), or reads `credentials_secret` from `secret_namespace` (for S3 the keys
    `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, optionally `AWS_SESSION_TOKEN`)."""

    kind: str = Field(default="s3", pattern=r"^[a-z][a-z0-9-]*$")
    bucket: str = Field(min_length=3, max_length=222, pattern=r"^[a-z0-9][a-z0-9._-]+[a-z0-9]$")
    prefix: str = Field(default="", pattern=r"^[A-Za-z0-9_./-]*$")
    endpoint: str = ""
    region: str = ""
    sse: Literal["", "AES256", "aws:kms"] = ""
    kms_key_id: str = ""
    credentials_secret: str = ""
    secret_namespace: str = ""

    @property
    def uri(self) -> str:
        """`<kind>://<bucket>/<prefix>/`: every URI a backend gives under it starts so."""
        prefix = self.prefix.strip("/")
        root = f"{self.kind}://{self.bucket}/"
        return f"{root}{prefix}/" if prefix else root


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
    """The remote location a capture published a version to, from its `storageURI`
    (`<kind>://<bucket>/<prefix>/<id>/versions/<version>/`), with the endpoint, region,
    encryption and credentials of `spec` when it names that store. None: not in a remote
    store (a `file:` URI or a path: the node's root)."""
    kind, sep, rest = uri.partition("://")
    if not sep or kind == "file":
        return None
    bucket, _, key = rest.partition("/")
    tail = f"{checkpoint_id}/versions/{version}/"
    if not key.endswith(tail):
        return None
    prefix = key.removesuffix(tail).strip("/")
    if spec is not None and (spec.kind, spec.bucket) == (kind, bucket):
        return spec.model_copy(update={"prefix": prefix})
    return RemoteStorage(kind=kind, bucket=bucket, prefix=prefix)
