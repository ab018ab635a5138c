"""What each warmstart process may ask of the Kubernetes API: the RBAC allowlist (pure).

One row per (service account, scope, API group, resource, verb), naming the code that makes
the call. The manifests grant exactly these (`deploy/kubernetes/base/warmstart.yaml`,
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
  bound there only): the capture Jobs, restore-target pods' annotations, verified captures'
  verification pods, Events, the Checkpoints nodes restore from, and the credentials Secrets
  those Checkpoints name.

A grant with `names` covers those objects only (RBAC's `resourceNames`; a create cannot be
narrowed so). The controller's grants marked `certificate` exist only where it makes the
webhook's certificate (decision 0032); the cert-manager overlay leaves their roles empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from api.resources import GROUP

NAMESPACE = "warmstart-system"
CONTROLLER, WEBHOOK, NODE = "warmstart-controller", "warmstart-webhook", "warmstart-node"
ACCOUNTS = (CONTROLLER, WEBHOOK, NODE)
# What the controller's certificate step writes (by name: RBAC grants these objects only).
WEBHOOK_SERVICE, WEBHOOK_TLS_SECRET = "warmstart-webhook", "warmstart-webhook-tls"
VALIDATING_WEBHOOK, MUTATING_WEBHOOK = "warmstart-validate", "warmstart-restore-pods"
ADMISSION_GROUP = "admissionregistration.k8s.io"


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
    name: str = ""  # "": any object


@dataclass(frozen=True)
class Grant:
    """Verbs on a resource (on the objects of `names` only, if any), and the code whose
    calls need them; `certificate`: only where the controller makes the webhook's
    certificate."""

    account: str
    scope: Scope
    group: str
    resource: str
    verbs: tuple[str, ...]
    by: str
    names: tuple[str, ...] = ()
    certificate: bool = False

    def accesses(self) -> set[Access]:
        return {
            Access(self.account, self.scope, self.group, self.resource, verb, name)
            for verb in self.verbs
            for name in self.names or ("",)
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
        _CLUSTER,
        "",
        "nodes",
        ("list", "watch"),
        "kopf's watch of cordons, for capture before a drain (workers.drain)",
    ),
    Grant(
        CONTROLLER,
        _TENANT,
        GROUP,
        "podsnapshots",
        ("create",),
        "the PodSnapshot of a pod on a cordoned node (workers.drain)",
    ),
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
        "",
        "pods",
        ("create", "delete"),
        "a verified capture's verification pod: create_verification_pod, "
        "delete_verification_pod (decision 0045)",
    ),
    Grant(
        CONTROLLER,
        _TENANT,
        "events.k8s.io",
        "events",
        ("create",),
        "Events of captures and restores (publish_status)",
    ),
    Grant(
        CONTROLLER,
        _OWN,
        "",
        "secrets",
        ("create",),
        "the webhook's TLS Secret, made when missing (workers.webhook_certificate)",
        certificate=True,
    ),
    Grant(
        CONTROLLER,
        _OWN,
        "",
        "secrets",
        ("get", "patch"),
        "the webhook's TLS Secret, read and renewed (workers.webhook_certificate)",
        names=(WEBHOOK_TLS_SECRET,),
        certificate=True,
    ),
    Grant(
        CONTROLLER,
        _CLUSTER,
        ADMISSION_GROUP,
        "validatingwebhookconfigurations",
        ("get", "patch"),
        "its caBundle, the Secret's CA (workers.webhook_certificate)",
        names=(VALIDATING_WEBHOOK,),
        certificate=True,
    ),
    Grant(
        CONTROLLER,
        _CLUSTER,
        ADMISSION_GROUP,
        "mutatingwebhookconfigurations",
        ("get", "patch"),
        "as the validating one",
        names=(MUTATING_WEBHOOK,),
        certificate=True,
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
    Grant(
        WEBHOOK,
        _CLUSTER,
        "",
        "pods",
        ("get",),
        "the pod an eviction names: opted in to capture before a drain? (workers.eviction)",
    ),
    Grant(
        WEBHOOK,
        _CLUSTER,
        GROUP,
        "podsnapshots",
        ("get",),
        "that pod's drain PodSnapshot: its phase and deadline (workers.eviction)",
    ),
    Grant(
        WEBHOOK,
        _CLUSTER,
        "",
        "nodes",
        ("get",),
        "the pod's node, cordoned? while its PodSnapshot is not made (workers.eviction)",
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


def allowlist(account: str, *, certificate: bool = True) -> set[Access]:
    """Every access `account` is granted; without the certificate step's where the
    controller does not make the webhook's certificate."""
    return {
        a
        for grant in GRANTS
        if grant.account == account and (certificate or not grant.certificate)
        for a in grant.accesses()
    }
