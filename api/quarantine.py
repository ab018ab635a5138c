"""Quarantine records: which checkpoint version failed to restore on which node class (GPU
model, GPU driver, CRIU version), on which nodes, until when. The store keeps them
(`activities.storage.quarantine`); the CLI reads and clears them through the control side,
which mounts that store; the control side shows them on the Checkpoint's status.

The rules (`judge`, pure): each node records its own evidence of one version on its node
class, in the namespace whose restore failed (`QuarantineEvidence`); evidence lapses
`expiry_seconds` after that node's latest failure; a version is quarantined on a class
while at least `min_nodes` distinct nodes hold evidence that has not lapsed. Fewer is
pending evidence, which refuses nothing: one node's trouble (a bad disk, a neighbour eating
memory) cannot poison a checkpoint for its class.
Quarantines are per namespace: one namespace's failures never refuse another's restores.
Records written before namespaces (evidence without one, or an entry written before versions
and evidence existed: a `QuarantineEntry` file, of the whole checkpoint on its class) cannot
say whose they are: they are listed until they lapse (`expiry_seconds` after their latest
failure, or after its `since`) and cleared, never enforced.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime, timedelta

from pydantic import Field

from api.contract import Contract
from api.manifest import HostInfo


class NodeClass(Contract):
    gpu_model: str
    gpu_driver: str
    criu: str

    @property
    def key(self) -> str:
        text = json.dumps(self.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(text).hexdigest()[:16]

    def describe(self) -> str:
        gpus = f"{self.gpu_model}, driver {self.gpu_driver}" if self.gpu_model else "no GPU"
        return f"{gpus}, CRIU {self.criu}"


def node_class(host: HostInfo, *, criu: str) -> NodeClass:
    return NodeClass(gpu_model=host.gpu_model, gpu_driver=host.gpu_driver, criu=criu)


class QuarantinePolicy(Contract):
    """When failures quarantine a version: evidence from `min_nodes` distinct nodes, each
    lapsing `expiry_seconds` after that node's latest failure."""

    min_nodes: int = Field(default=2, ge=1)
    expiry_seconds: float = Field(default=86400.0, gt=0, allow_inf_nan=False)

    @property
    def expiry(self) -> timedelta:
        return timedelta(seconds=self.expiry_seconds)


class QuarantineEvidence(Contract):
    """One node's failed restores of a checkpoint version on its node class."""

    checkpoint_id: str
    version: str
    node_class: NodeClass
    node: str
    reason: str
    message: str
    since: datetime  # its first failure (of this evidence, since it last lapsed)
    last: datetime  # its latest failure: the evidence lapses `expiry_seconds` after it
    failures: int = 1
    # The namespace whose restore failed: one checkpoint ID may be captured in several
    # namespaces (each owns its own versions), and one's failures never quarantine another's.
    # Empty: recorded before evidence had a namespace (listed and cleared, not enforced).
    namespace: str = ""


class QuarantineEntry(Contract):
    """A checkpoint version's standing on a node class: quarantined (`active`), or pending
    (evidence from fewer nodes than a quarantine needs). `version` empty: every version (an
    entry recorded before versions were keyed)."""

    checkpoint_id: str
    node_class: NodeClass
    reason: str  # of the latest failure
    message: str
    node: str  # the node of the latest failure
    since: datetime  # when it took effect (pending: the first failure)
    version: str = ""
    nodes: tuple[str, ...] = ()  # the distinct nodes whose evidence holds
    expires: datetime | None = None  # when it lapses, unless nodes fail again
    active: bool = True
    min_nodes: int = 1  # how many nodes a quarantine needs
    namespace: str = ""  # whose restores it refuses; empty: recorded before namespaces

    def describe(self) -> str:
        what = f"checkpoint {self.checkpoint_id}"
        what += f" version {self.version}" if self.version else " (every version)"
        nodes = ", ".join(self.nodes or (self.node,))
        until = f" until {self.expires:%Y-%m-%d %H:%M:%S}Z" if self.expires else ""
        if not self.active:
            return (
                f"{what}: pending on node class [{self.node_class.describe()}] after "
                f"{self.reason} on node(s) {nodes} ({len(self.nodes)} of the {self.min_nodes} "
                f"nodes a quarantine needs){until}"
            )
        return (
            f"{what} is quarantined on node class [{self.node_class.describe()}] since "
            f"{self.since:%Y-%m-%d %H:%M:%S}Z after {self.reason} on node(s) {nodes}{until}; "
            f"clear it with `warmstart quarantine clear {self.checkpoint_id}`"
        )


def judge(
    evidence: Iterable[QuarantineEvidence], policy: QuarantinePolicy, *, now: datetime
) -> list[QuarantineEntry]:
    """Each (checkpoint, namespace, version, node class) that has evidence not lapsed at
    `now`, as an entry: active with `min_nodes` distinct nodes, else pending; oldest
    first."""
    groups: dict[tuple[str, str, str, str], dict[str, QuarantineEvidence]] = defaultdict(dict)
    for item in evidence:
        if item.last + policy.expiry <= now:
            continue
        key = (item.checkpoint_id, item.namespace, item.version, item.node_class.key)
        by_node = groups[key]
        held = by_node.get(item.node)
        if held is None or item.last > held.last:
            by_node[item.node] = item
    entries = [_entry(list(by_node.values()), policy) for by_node in groups.values()]
    return sorted(entries, key=lambda entry: (entry.since, entry.version))


def _entry(held: list[QuarantineEvidence], policy: QuarantinePolicy) -> QuarantineEntry:
    latest = max(held, key=lambda item: item.last)
    active = len(held) >= policy.min_nodes
    lasts = sorted((item.last for item in held), reverse=True)
    firsts = sorted(item.since for item in held)
    # Active while `min_nodes` nodes' evidence holds: until the min_nodes-th newest lapses.
    expires = (lasts[policy.min_nodes - 1] if active else lasts[0]) + policy.expiry
    return QuarantineEntry(
        checkpoint_id=latest.checkpoint_id,
        node_class=latest.node_class,
        reason=latest.reason,
        message=latest.message,
        node=latest.node,
        since=firsts[policy.min_nodes - 1] if active else firsts[0],
        version=latest.version,
        nodes=tuple(sorted(item.node for item in held)),
        expires=expires,
        active=active,
        min_nodes=policy.min_nodes,
        namespace=latest.namespace,
    )


def legacy_entry(
    entry: QuarantineEntry, policy: QuarantinePolicy, *, now: datetime
) -> QuarantineEntry | None:
    """An entry recorded before versions and evidence (one failure quarantined the whole
    checkpoint on its class), as listed: of every version, lapsing `expiry_seconds` after
    its `since`; None once lapsed. It refuses no restore (it has no namespace)."""
    expires = entry.expires or entry.since + policy.expiry
    if expires <= now:
        return None
    return entry.model_copy(
        update={"nodes": entry.nodes or (entry.node,), "expires": expires, "active": True}
    )
