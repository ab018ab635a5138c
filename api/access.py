"""What each warmstart process may ask of the Kubernetes API: the RBAC allowlist (pure).

One row per (service account, scope, API group, resource, verb), naming the code that makes
the call. The manifests grant exactly these (`deploy/kubernetes/warmstart.yaml`,
`deploy/kubernetes/tenant.yaml`), and the processes' real code paths make exactly these
calls (`tests/test_rbac.py` checks both: a rule added or missing on either side fails it).
Decision 0025 says why each scope is what it is.

Scopes:

- `cluster`: every namespace, or a cluster-scoped resource (a ClusterRole bound by a
  ClusterRoleBinding). Only reads the design needs cluster-wide (kopf watches cluster-wide,
  and RBAC cannot narrow a list by label or field), cluster-scoped Nodes, and writes to our
  own resources (finalizers, status), so a resource in any namespace can be told why its
  capture failed.
- `own`: the namespace warmstart is installed in, `warmstart-system` (a Role).
- `tenant`: namespaces that opt in, each by the RoleBindings of `tenant.yaml` (a ClusterRole
  bound there only): the capture Jobs, restore-target pods' annotations, Events, the
  Checkpoints nodes restore from, and the credentials Secrets those Checkpoints name.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from api.resources import GROUP

NAMESPACE = "warmstart-system"
CONTROLLER, WEBHOOK, NODE = "warmstart-controller", "warmstart-webhook", "warmstart-node"
ACCOUNTS = (CONTROLLER, WEBHOOK, NODE)


class Scope(StrEnum):
    CLUSTER = "cluster"
    OWN = "own"
    TENANT = "tenant"


@dataclass(frozen=True)
class Access:
    """One verb on one resource (`checkpoints/status` for a subresource) of one API group
    (`""`: the core group), for one service account in one scope."""

    account: str
    scope: Scope
    group: str
    resource: str
    verb: str


@dataclass(frozen=True)
class Grant:
    """Verbs on a resource, and the code whose calls need them."""

    account: str
    scope: Scope
    group: str
    resource: str
    verbs: tuple[str, ...]
    by: str

    def accesses(self) -> set[Access]:
        return {
            Access(self.account, self.scope, self.group, self.resource, verb) for verb in self.verbs
        }


_CLUSTER, _OWN, _TENANT = Scope.CLUSTER, Scope.OWN, Scope.TENANT
GRANTS: tuple[Grant, ...] = (
    # --- the controller: watcher (kopf), Lease elector, control activities, retention ----
    Grant(
        CONTROLLER,
        _CLUSTER,
        GROUP,
        "checkpoints",
        ("get", "list", "watch", "patch"),
        "kopf's watch, finalizer and annotations (workers.watcher); the control activities' "
        "read (activities.kube.control); retention's list of Ready ones (ready_references)",
    ),
    Grant(
        CONTROLLER,
        _CLUSTER,
        GROUP,
        "podsnapshots",
        ("get", "list", "watch", "patch"),
        "as checkpoints",
    ),
    Grant(
        CONTROLLER,
        _CLUSTER,
        GROUP,
        "checkpoints/status",
        ("patch",),
        "publish_status; kopf's refusal of a spec (workers.watcher)",
    ),
    Grant(CONTROLLER, _CLUSTER, GROUP, "podsnapshots/status", ("patch",), "as checkpoints"),
    Grant(
        CONTROLLER,
        _CLUSTER,
        "",
        "pods",
        ("get", "list", "watch"),
        "kopf's watch of capture pods (by label: RBAC cannot narrow it); read_capture_pod",
    ),
    Grant(CONTROLLER, _CLUSTER, "", "nodes", ("list",), "nodes_matching (prefetch selectors)"),
    Grant(
        CONTROLLER,
        _OWN,
        "coordination.k8s.io",
        "leases",
        ("get", "create", "patch"),
        "the watcher's Lease (workers.leader); checkpoint ID claims (claim_checkpoint_id)",
    ),
    Grant(
        CONTROLLER,
        _TENANT,
        "batch",
        "jobs",
        ("get", "create", "delete"),
        "the capture Job: create_capture_job, read_capture_pod, delete_capture_job",
    ),
    Grant(
        CONTROLLER,
        _TENANT,
        "",
        "pods",
        ("patch",),
        "a restore target's restore-status annotation (publish_status of a restore)",
    ),
    Grant(
        CONTROLLER,
        _TENANT,
        "events.k8s.io",
        "events",
        ("create",),
        "Events of captures and restores (publish_status)",
    ),
    # --- the admission webhook ------------------------------------------------------------
    Grant(
        WEBHOOK,
        _CLUSTER,
        GROUP,
        "checkpoints",
        ("get",),
        "the Checkpoint a restore-target pod names, in the pod's namespace (workers.webhook)",
    ),
    # --- the node worker ------------------------------------------------------------------
    Grant(
        NODE,
        _CLUSTER,
        "",
        "pods",
        ("list", "watch"),
        "the restore targets bound to its node (field selector spec.nodeName: RBAC cannot "
        "narrow it; workers.restore_targets)",
    ),
    Grant(
        NODE,
        _TENANT,
        GROUP,
        "checkpoints",
        ("get",),
        "the Checkpoint a restore-target pod names, in the pod's namespace: what the node "
        "restores (workers.checkpoints, workers.restore_targets)",
    ),
    Grant(
        NODE,
        _TENANT,
        "",
        "secrets",
        ("get",),
        "a Checkpoint's storage credentials Secret, in its namespace (workers.compose)",
    ),
)


def allowlist(account: str) -> set[Access]:
    """Every access `account` is granted."""
    return {a for grant in GRANTS if grant.account == account for a in grant.accesses()}
