"""Retention: which committed checkpoint versions to delete, decided by a pure function.

Per namespace (the manifest's `source.namespace`) a policy keeps the N newest versions of
each checkpoint ID, deletes versions older than a maximum age, then deletes the oldest
versions while the namespace holds more than a byte budget. A protected version (one a
live restore or a Ready resource references) is never deleted, nor is the newest version
of any checkpoint that has a protected reference.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from datetime import datetime, timedelta

from pydantic import Field

from api.contract import Contract

RETENTION_WORKFLOW = "RetentionWorkflow"
RETENTION_SCHEDULE_ID = "warmstart-retention"
_GIB = 1 << 30


class RetentionPolicy(Contract):
    """What one namespace keeps; None switches a limit off."""

    keep_newest_per_identity: int = Field(default=3, ge=1)
    max_age_days: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_total_bytes: int | None = Field(default=None, ge=0)


class RetentionPolicies(Contract):
    """The default policy plus overrides by namespace."""

    default: RetentionPolicy = RetentionPolicy()
    by_namespace: dict[str, RetentionPolicy] = Field(default_factory=dict)

    def for_namespace(self, namespace: str) -> RetentionPolicy:
        return self.by_namespace.get(namespace, self.default)


class CheckpointVersion(Contract):
    """One committed version, as its manifest describes it."""

    checkpoint_id: str
    version: str
    namespace: str
    size_bytes: int = Field(ge=0)
    created_at: datetime


class ProtectedRef(Contract):
    """A reference that keeps a version: `version` empty means the checkpoint's newest."""

    checkpoint_id: str
    version: str = ""
    referrer: str = ""  # who holds it, for logs: a restore's workflow ID, a resource


class Deletion(Contract):
    """A version to delete, and why."""

    checkpoint_id: str
    version: str
    namespace: str
    size_bytes: int
    reason: str


def plan_deletions(
    versions: Iterable[CheckpointVersion],
    policy: RetentionPolicies | RetentionPolicy,
    *,
    now: datetime,
    protected: Collection[ProtectedRef],
) -> list[Deletion]:
    """The versions to delete, oldest first, each with its reason (see the module's
    docstring for the rules; the first rule that applies names the reason)."""
    policies = (
        policy if isinstance(policy, RetentionPolicies) else RetentionPolicies(default=policy)
    )
    by_namespace: dict[str, list[CheckpointVersion]] = defaultdict(list)
    for version in versions:
        by_namespace[version.namespace].append(version)
    kept = _kept(by_namespace.values(), protected)
    deletions: list[Deletion] = []
    for namespace, members in sorted(by_namespace.items()):
        ns_policy = policies.for_namespace(namespace)
        deletions += _plan_namespace(namespace, members, ns_policy, now=now, kept=kept)
    return sorted(deletions, key=lambda d: (d.checkpoint_id, d.version))


def _newest_first(versions: Iterable[CheckpointVersion]) -> list[CheckpointVersion]:
    return sorted(versions, key=lambda v: (v.created_at, v.version), reverse=True)


def _kept(
    groups: Iterable[list[CheckpointVersion]], protected: Collection[ProtectedRef]
) -> set[tuple[str, str]]:
    """(checkpoint ID, version) pairs no rule may delete: every protected version and the
    newest version of every checkpoint with a protected reference."""
    pinned = {(ref.checkpoint_id, ref.version) for ref in protected if ref.version}
    referenced = {ref.checkpoint_id for ref in protected}
    newest: dict[str, CheckpointVersion] = {}
    for group in groups:
        for version in group:
            best = newest.get(version.checkpoint_id)
            if best is None or (version.created_at, version.version) > (
                best.created_at,
                best.version,
            ):
                newest[version.checkpoint_id] = version
    return pinned | {(cid, newest[cid].version) for cid in referenced if cid in newest}


def _plan_namespace(
    namespace: str,
    versions: list[CheckpointVersion],
    policy: RetentionPolicy,
    *,
    now: datetime,
    kept: set[tuple[str, str]],
) -> list[Deletion]:
    reasons: dict[tuple[str, str], str] = {}
    by_checkpoint: dict[str, list[CheckpointVersion]] = defaultdict(list)
    for version in versions:
        by_checkpoint[version.checkpoint_id].append(version)
    keep = policy.keep_newest_per_identity
    for members in by_checkpoint.values():
        for version in _newest_first(members)[keep:]:
            reasons[_key(version)] = f"beyond the {keep} newest"
    if policy.max_age_days is not None:
        cutoff = now - timedelta(days=policy.max_age_days)
        for version in versions:
            if version.created_at < cutoff:
                reasons.setdefault(_key(version), f"older than {policy.max_age_days:g} days")
    for key in kept:
        reasons.pop(key, None)
    if policy.max_total_bytes is not None:
        _over_budget(namespace, versions, policy.max_total_bytes, reasons=reasons, kept=kept)
    return [
        Deletion(
            checkpoint_id=v.checkpoint_id,
            version=v.version,
            namespace=namespace,
            size_bytes=v.size_bytes,
            reason=reasons[_key(v)],
        )
        for v in versions
        if _key(v) in reasons
    ]


def _over_budget(
    namespace: str,
    versions: list[CheckpointVersion],
    budget: int,
    *,
    reasons: dict[tuple[str, str], str],
    kept: set[tuple[str, str]],
) -> None:
    """Add the oldest deletable versions to `reasons` while the survivors exceed `budget`
    (protected ones count towards it but stay; the budget may then remain exceeded)."""
    total = sum(v.size_bytes for v in versions if _key(v) not in reasons)
    for version in reversed(_newest_first(versions)):
        if total <= budget:
            return
        key = _key(version)
        if key in reasons or key in kept:
            continue
        reasons[key] = f"over {_size(budget)} for namespace {namespace}"
        total -= version.size_bytes


def _key(version: CheckpointVersion) -> tuple[str, str]:
    return version.checkpoint_id, version.version


def _size(n: int) -> str:
    """`100 GiB`, `1.5 GiB`, or bytes below one GiB."""
    return f"{n / _GIB:g} GiB" if n >= _GIB else f"{n} bytes"
