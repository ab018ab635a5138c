"""The pure retention plan: keep N newest, max age, max bytes, protected references, per
namespace policies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from api.retention import (
    CheckpointVersion,
    Deletion,
    ProtectedRef,
    RetentionPolicies,
    RetentionPolicy,
    plan_deletions,
)

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
A, B = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"
GIB = 1 << 30


def version(
    checkpoint_id: str, days_old: float, *, namespace: str = "ns", size: int = GIB
) -> CheckpointVersion:
    created = NOW - timedelta(days=days_old)
    return CheckpointVersion(
        checkpoint_id=checkpoint_id,
        version=f"{created:%Y%m%dT%H%M%SZ}-{checkpoint_id[:6]}",
        namespace=namespace,
        size_bytes=size,
        created_at=created,
    )


def planned(
    versions: list[CheckpointVersion],
    policy: RetentionPolicy | RetentionPolicies,
    protected: tuple[ProtectedRef, ...] = (),
) -> dict[tuple[str, str], str]:
    plan = plan_deletions(versions, policy, now=NOW, protected=protected)
    return {(d.checkpoint_id, d.version): d.reason for d in plan}


def key(v: CheckpointVersion) -> tuple[str, str]:
    return v.checkpoint_id, v.version


def test_keeps_the_newest_per_identity() -> None:
    a = [version(A, days) for days in (1, 2, 3, 4, 5)]
    b = [version(B, days) for days in (1, 2)]
    reasons = planned(a + b, RetentionPolicy(keep_newest_per_identity=3))
    assert reasons == {key(a[3]): "beyond the 3 newest", key(a[4]): "beyond the 3 newest"}


def test_deletes_older_than_max_age() -> None:
    a = [version(A, days) for days in (1, 29, 31)]
    reasons = planned(a, RetentionPolicy(keep_newest_per_identity=5, max_age_days=30))
    assert reasons == {key(a[2]): "older than 30 days"}


def test_over_the_namespace_budget_deletes_oldest_first() -> None:
    a = [version(A, days) for days in (1, 3, 5)]
    b = [version(B, days) for days in (2, 4)]
    policy = RetentionPolicy(keep_newest_per_identity=5, max_total_bytes=3 * GIB)
    reasons = planned(a + b, policy)
    # Oldest first: A@5 days, then B@4 days brings 5 GiB down to 3 GiB.
    assert reasons == {
        key(a[2]): "over 3 GiB for namespace ns",
        key(b[1]): "over 3 GiB for namespace ns",
    }


def test_budget_counts_only_survivors_of_the_other_rules() -> None:
    a = [version(A, days) for days in (1, 2, 3)]
    policy = RetentionPolicy(keep_newest_per_identity=2, max_total_bytes=2 * GIB)
    assert planned(a, policy) == {key(a[2]): "beyond the 2 newest"}


def test_protected_versions_are_never_deleted() -> None:
    a = [version(A, days) for days in (1, 2, 40)]
    policy = RetentionPolicy(keep_newest_per_identity=1, max_age_days=30, max_total_bytes=0)
    protected = (ProtectedRef(checkpoint_id=A, version=a[2].version, referrer="restore/x"),)
    reasons = planned(a, policy, protected)
    assert key(a[2]) not in reasons
    assert key(a[0]) not in reasons  # the newest of a protected checkpoint stays too
    assert reasons == {key(a[1]): "beyond the 1 newest"}


def test_a_reference_without_version_keeps_the_newest() -> None:
    a = [version(A, days) for days in (31, 32)]
    policy = RetentionPolicy(keep_newest_per_identity=1, max_age_days=30)
    reasons = planned(a, policy, (ProtectedRef(checkpoint_id=A),))
    assert reasons == {key(a[1]): "beyond the 1 newest"}


def test_unprotected_checkpoints_can_lose_every_version_to_age() -> None:
    a = [version(A, 40)]
    assert planned(a, RetentionPolicy(max_age_days=30)) == {key(a[0]): "older than 30 days"}


def test_policies_apply_per_namespace() -> None:
    a = [version(A, days, namespace="prod") for days in (1, 2, 3)]
    b = [version(B, days, namespace="dev") for days in (1, 2, 3)]
    policies = RetentionPolicies(
        default=RetentionPolicy(keep_newest_per_identity=3),
        by_namespace={"dev": RetentionPolicy(keep_newest_per_identity=1)},
    )
    reasons = planned(a + b, policies)
    assert set(reasons) == {key(b[1]), key(b[2])}


def test_budgets_are_per_namespace() -> None:
    a = [version(A, days, namespace="prod") for days in (1, 2)]
    b = [version(B, days, namespace="dev") for days in (1, 2)]
    policy = RetentionPolicy(max_total_bytes=2 * GIB)
    assert planned(a + b, policy) == {}


def test_deletions_carry_size_and_namespace() -> None:
    a = [version(A, days, size=7) for days in (1, 2)]
    [deletion] = plan_deletions(
        a, RetentionPolicy(keep_newest_per_identity=1), now=NOW, protected=()
    )
    assert deletion == Deletion(
        checkpoint_id=A,
        version=a[1].version,
        namespace="ns",
        size_bytes=7,
        reason="beyond the 1 newest",
    )


def test_policy_bounds() -> None:
    with pytest.raises(ValidationError):
        RetentionPolicy(keep_newest_per_identity=0)
    with pytest.raises(ValidationError):
        RetentionPolicy(max_age_days=-1)
