"""Request and summary contracts of RetentionWorkflow (apart from the workflow module so
the CLI and the schedule can build and read them without importing activities)."""

from __future__ import annotations

from pydantic import Field

from api.contract import Contract
from api.retention import Deletion, RetentionPolicies

# Staging untouched this long was left by a dump that cannot be running any more (the
# longest dump may take 30 minutes; see workflows.policies.DUMP).
DEFAULT_STAGING_AGE_SECONDS = 2 * 3600.0
# A multipart upload is resumed across retries of up to 6 hours each (workflows.policies.
# UPLOAD, five attempts); one initiated two days ago has no uploader left.
DEFAULT_UPLOAD_AGE_SECONDS = 2 * 86400.0


class RetentionRequest(Contract):
    policies: RetentionPolicies = RetentionPolicies()
    # Plan and report only: nothing is deleted or swept.
    dry_run: bool = False
    staging_older_than_seconds: float = Field(
        default=DEFAULT_STAGING_AGE_SECONDS, gt=0, allow_inf_nan=False
    )
    # Apply the policies to the worker's S3 location too (settings.storage.s3_bucket) and
    # abort its incomplete uploads; off, the run's steps are those of before remote storage.
    remote: bool = False
    uploads_older_than_seconds: float = Field(
        default=DEFAULT_UPLOAD_AGE_SECONDS, ge=0, allow_inf_nan=False
    )


class RemoteSummary(Contract):
    """What a run deleted (or would delete) and kept in S3; aborted uploads as URIs."""

    location: str
    deleted: tuple[Deletion, ...]
    bytes_freed: int
    kept: int
    aborted_uploads: tuple[str, ...] = ()


class RetentionSummary(Contract):
    """What a run deleted (or, dry, would delete) and kept; swept paths are relative to
    the checkpoint root."""

    dry_run: bool
    deleted: tuple[Deletion, ...]
    bytes_freed: int
    kept: int
    protected: int
    swept_staging: tuple[str, ...] = ()
    swept_half_deleted: tuple[str, ...] = ()
    swept_quarantine: tuple[str, ...] = ()
    remote: RemoteSummary | None = None  # set where the request included remote storage
