"""Every S3 request goes through `S3Calls`, which maps boto3's failures once into the
project's error tree, naming the bucket or object:

- no such bucket, rejected credentials, access denied, other refusals → `StorageError`
- no such key                                                        → `CheckpointNotFoundError`
- object changed between ranged reads (412)                          → `DigestMismatchError`
- endpoint unreachable, timeouts, 5xx, throttling, a vanished upload → `UnavailableError`
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    NoCredentialsError,
    ResponseStreamingError,
)

from activities.storage.objectstore.transfer import TransferSettings
from api.errors import (
    CheckpointNotFoundError,
    DigestMismatchError,
    StorageError,
    UnavailableError,
    WarmstartError,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        GetObjectRequestTypeDef,
        ListMultipartUploadsOutputTypeDef,
        ListMultipartUploadsRequestPaginateTypeDef,
        ListObjectsV2OutputTypeDef,
        ListObjectsV2RequestPaginateTypeDef,
        ListPartsOutputTypeDef,
        ListPartsRequestPaginateTypeDef,
    )
    from typing_extensions import Unpack

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_REFUSED_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "403",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
}
_TRANSIENT = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "NoSuchUpload"}


def client_config(settings: TransferSettings) -> Config:
    """The botocore config a client for these settings needs: a connection per thread
    (uploads and downloads run up to two pools of `concurrency` threads), standard retries."""
    return Config(
        max_pool_connections=2 * settings.concurrency + 2,
        retries={"max_attempts": 5, "mode": "standard"},
    )


class S3Calls:
    """A boto3 S3 client (built by the caller) whose errors come out mapped. Calls are
    typed by the client's own methods: `s3.call(s3.client.head_object, Bucket=b, Key=k)`."""

    def __init__(self, client: S3Client) -> None:
        self.client = client

    def call(self, operation: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`operation(**kwargs)`, a method of `client`, with its failure mapped."""
        try:
            return operation(*args, **kwargs)
        except (ClientError, BotoCoreError) as err:
            raise mapped(err, operation=operation.__name__, **kwargs) from err

    def read(self, **kwargs: Unpack[GetObjectRequestTypeDef]) -> bytes:
        """get_object's body, read whole (its streaming errors mapped too)."""
        try:
            return self.client.get_object(**kwargs)["Body"].read()
        except (ClientError, BotoCoreError) as err:
            raise mapped(err, operation="get_object", **kwargs) from err

    def read_if_present(self, **kwargs: Unpack[GetObjectRequestTypeDef]) -> bytes | None:
        try:
            return self.read(**kwargs)
        except CheckpointNotFoundError:
            return None

    def list_objects(
        self, **kwargs: Unpack[ListObjectsV2RequestPaginateTypeDef]
    ) -> Iterator[ListObjectsV2OutputTypeDef]:
        """Pages of ListObjectsV2 (keys, sizes and ETags; no object is read)."""
        paginator = self.client.get_paginator("list_objects_v2")
        return _mapped_pages("list_objects_v2", paginator.paginate(**kwargs), kwargs)

    def list_uploads(
        self, **kwargs: Unpack[ListMultipartUploadsRequestPaginateTypeDef]
    ) -> Iterator[ListMultipartUploadsOutputTypeDef]:
        paginator = self.client.get_paginator("list_multipart_uploads")
        return _mapped_pages("list_multipart_uploads", paginator.paginate(**kwargs), kwargs)

    def list_parts(
        self, **kwargs: Unpack[ListPartsRequestPaginateTypeDef]
    ) -> Iterator[ListPartsOutputTypeDef]:
        paginator = self.client.get_paginator("list_parts")
        return _mapped_pages("list_parts", paginator.paginate(**kwargs), kwargs)


def _mapped_pages(operation: str, pages: Iterable[T], where: Mapping[str, Any]) -> Iterator[T]:
    try:
        yield from pages
    except (ClientError, BotoCoreError) as err:
        raise mapped(err, operation=operation, **where) from err


def mapped(err: Exception, *, operation: str, **kwargs: Any) -> WarmstartError:
    bucket = kwargs.get("Bucket", "")
    where = f"s3://{bucket}/{kwargs.get('Key') or kwargs.get('Prefix', '')}"
    if isinstance(err, NoCredentialsError):
        return StorageError(f"{where}: no S3 credentials found (boto3's chain or the Secret)")
    if isinstance(err, ConnectionError | HTTPClientError | ResponseStreamingError):
        return UnavailableError(f"{where}: {operation}: S3 endpoint unreachable: {err}")
    if not isinstance(err, ClientError):
        return UnavailableError(f"{where}: {operation} failed: {err}")
    error = err.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    detail = f"{operation}: {code} {error.get('Message', '')}".strip()
    if code == "NoSuchBucket":
        return StorageError(f"s3://{bucket}: bucket does not exist ({operation})")
    if code in _REFUSED_CREDENTIALS:
        return StorageError(f"{where}: credentials rejected or access denied ({detail})")
    if code in _MISSING_KEY:
        return CheckpointNotFoundError(f"{where} does not exist")
    if code in {"PreconditionFailed", "412"}:
        return DigestMismatchError(f"{where} changed while it was being read")
    if code in _TRANSIENT or status >= 500:
        return UnavailableError(f"{where}: {detail}")
    return StorageError(f"{where}: {detail}")
