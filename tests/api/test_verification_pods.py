"""A verified capture's verification pod on a cluster (decision 0045): shaped from the
Checkpoint's own template as the webhook shapes a restore target, pinned to the capturing
node, owned by the Checkpoint and labelled as a verification; and the node's claim rule:
while the Checkpoint is verifying, that one pod (by UID) restores that one version, held
back, and no other pod restores anything the Checkpoint does not offer; and the status that
names it while, and only while, it runs."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from activities.kube.control import status_patch
from api.errors import CheckpointNotFoundError, ForbiddenError, InvalidSpecError
from api.reasons import Phase, Reason
from api.resources import Checkpoint, VerifyingStatus
from api.restore_claims import RestoreClaims, check_claims, verification_claims
from api.restore_pods import (
    STANDBY_SCRIPT,
    RestoreSettings,
    restore_pod,
    verification_pod,
    verification_pod_name,
)
from api.status import Report, next_status

CKPT, READY, NEW = "96429b2725761a09", "20261127T120000Z-abcdef", "20261128T080000Z-012345"
DIGEST = "ab" * 32
POD_UID = "9f1c2d3e-0000-4000-8000-000000000001"
TEMPLATE = {
    "metadata": {"labels": {"app": "llama"}, "annotations": {"team": "b"}},
    "spec": {
        "containers": [
            {
                "name": "main",
                "image": "vllm",
                "command": ["python3", "-m", "serve"],
                "readinessProbe": {"httpGet": {"path": "/health", "port": 8000}},
            }
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
    },
}


def checkpoint(*, phase: str = "Uploading", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "Checkpoint",
        "metadata": {"name": "llama", "namespace": "team-b", "uid": "ckpt-uid-1"},
        "spec": {
            "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
            "job": {"podTemplateSpec": TEMPLATE},
            "verify": True,
        },
        "status": {"phase": phase, "checkpointID": CKPT, **status},
    }


VERIFYING = {"version": NEW, "manifestSHA256": DIGEST, "podName": "x", "podUID": POD_UID}


def target(*, uid: str = POD_UID, version: str = NEW) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "llama-verify",
            "namespace": "team-b",
            "uid": uid,
            "labels": {
                "warmstart.dev/restore-target": "true",
                "warmstart.dev/checkpoint-id": CKPT,
                "warmstart.dev/verification": "true",
            },
            "annotations": {
                "warmstart.dev/restore-from": "llama",
                "warmstart.dev/checkpoint-version": version,
            },
        }
    }


# --- the node's claim rule ---------------------------------------------------------------


def test_the_verification_pod_restores_the_held_back_version_from_the_node() -> None:
    verifying = checkpoint(verifying=VERIFYING)
    expected = RestoreClaims(CKPT, NEW, None, manifest_sha256=DIGEST, unverified=True)
    assert check_claims(target(), verifying) == expected
    assert verification_claims(verifying, pod_uid=POD_UID) == expected


def test_any_other_pod_naming_a_verifying_checkpoint_is_refused() -> None:
    verifying = checkpoint(verifying=VERIFYING)
    # Another pod: the Checkpoint is not Ready.
    plain = target(uid="another-uid")
    del plain["metadata"]["labels"]["warmstart.dev/verification"]
    with pytest.raises(CheckpointNotFoundError, match=r"is not Ready \(phase Uploading\)"):
        check_claims(plain, verifying)
    # Another pod labelled as a verification (the webhook leaves it unshaped): refused.
    with pytest.raises(ForbiddenError, match="checkpoint llama verifies no pod of its UID"):
        check_claims(target(uid="another-uid"), verifying)
    ready = checkpoint(phase="Ready", version=NEW)
    with pytest.raises(ForbiddenError, match="checkpoint llama verifies no pod of its UID"):
        check_claims(target(uid="another-uid"), ready)
    assert verification_claims(verifying, pod_uid="another-uid") is None
    assert verification_claims(verifying, pod_uid="") is None
    # That pod, claiming another version than the one verified.
    with pytest.raises(ForbiddenError, match=f"is not the version of checkpoint llama \\({NEW}\\)"):
        check_claims(target(version=READY), verifying)
    # That pod once the verification is over (the status no longer names it).
    with pytest.raises(ForbiddenError, match="checkpoint llama verifies no pod of its UID"):
        check_claims(target(), checkpoint(phase="Failed"))


def test_while_a_recapture_verifies_other_pods_restore_the_ready_version_only() -> None:
    """A later run verifies its version while the resource stays Ready with the published
    one (decision 0043): other pods get the published version, the pod named gets the new
    one, and neither gets the other's."""
    ready = checkpoint(phase="Ready", version=READY, verifying=VERIFYING)
    other = target(uid="another-uid", version=READY)
    del other["metadata"]["labels"]["warmstart.dev/verification"]
    assert check_claims(other, ready) == RestoreClaims(CKPT, READY, None)
    other["metadata"]["annotations"]["warmstart.dev/checkpoint-version"] = NEW
    with pytest.raises(ForbiddenError, match=f"is not the version of checkpoint llama \\({READY}"):
        check_claims(other, ready)
    assert check_claims(target(), ready).version == NEW
    with pytest.raises(ForbiddenError, match=f"is not the version of checkpoint llama \\({NEW}"):
        check_claims(target(version=READY), ready)


# --- the verification pod's shape -------------------------------------------------------


def shaped(node: str = "gpu-7") -> dict[str, Any]:
    resource = Checkpoint.model_validate(checkpoint())
    return verification_pod(
        resource,
        checkpoint_id=CKPT,
        version=NEW,
        node=node,
        settings=RestoreSettings(node_labels=()),
        workflow_id="capture/team-b/llama/ckpt-uid-1",
    )


def test_it_is_the_template_shaped_as_a_restore_target_of_the_version() -> None:
    pod = shaped()
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["name"] == verification_pod_name("llama", NEW)
    assert meta["name"].startswith("llama-verify-") and len(meta["name"]) <= 63
    assert meta["namespace"] == "team-b"
    assert meta["labels"] == {
        "app": "llama",
        "warmstart.dev/verification": "true",
        "warmstart.dev/checkpoint": "llama",
        "warmstart.dev/restore-target": "true",
        "warmstart.dev/checkpoint-id": CKPT,
    }
    assert meta["annotations"] == {
        "team": "b",
        "warmstart.dev/restore-from": "llama",
        "warmstart.dev/target-container": "main",
        "warmstart.dev/capture-workflow": "capture/team-b/llama/ckpt-uid-1",
        "warmstart.dev/checkpoint-version": NEW,
    }
    # No capture-pod label: the watcher's capture-pod handler never reports on it.
    assert "warmstart.dev/checkpoint-uid" not in meta["labels"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "warmstart.dev/v1alpha1",
            "kind": "Checkpoint",
            "name": "llama",
            "uid": "ckpt-uid-1",
            "controller": True,
        }
    ]
    [main] = spec["containers"]
    assert main["command"][:3] == ["/bin/sh", "-c", STANDBY_SCRIPT]
    assert main["command"][4:] == ["python3", "-m", "serve"]
    env = {e["name"]: e.get("value") for e in main["env"]}
    assert env["WARMSTART_RESTORE_STANDBY"] == "1" and env["WARMSTART_STANDBY_ANNOUNCES"] == "1"
    assert main["startupProbe"]["httpGet"] == {"path": "/health", "port": 8000}
    assert main["readinessProbe"] == {"httpGet": {"path": "/health", "port": 8000}}
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["seccompProfile"]["type"] == "Localhost"
    # The same shaping as the webhook's for a pod of that template asking for a Ready
    # Checkpoint of that version (its containers, volumes and security alike).
    asked = {
        "metadata": {"name": "p", "annotations": {"warmstart.dev/restore-from": "llama"}},
        "spec": copy.deepcopy(TEMPLATE["spec"]),
    }
    ready = checkpoint(phase="Ready", version=NEW)
    webhook = restore_pod(asked, checkpoint=ready, settings=RestoreSettings(node_labels=()))
    for part in ("containers", "volumes", "securityContext"):
        assert spec[part] == webhook["spec"][part]


def test_it_is_required_onto_the_capturing_node_in_each_of_the_templates_terms() -> None:
    terms = shaped("gpu-7")["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    pinned = [{"key": "metadata.name", "operator": "In", "values": ["gpu-7"]}]
    assert terms == [
        {
            "matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}],
            "matchFields": pinned,
        }
    ]
    assert "nodeName" not in shaped()["spec"]  # the scheduler places it, once devices free


def test_the_webhook_leaves_a_verification_pod_as_it_is() -> None:
    pod = shaped()
    assert restore_pod(pod, checkpoint=checkpoint(), settings=RestoreSettings()) == pod


def test_a_template_the_standby_cannot_start_is_refused_naming_why() -> None:
    body = checkpoint()
    body["spec"]["job"]["podTemplateSpec"] = {
        "spec": {"containers": [{"name": "main", "image": "vllm"}]}
    }
    with pytest.raises(InvalidSpecError, match="cannot be verified: container main has no command"):
        verification_pod(
            Checkpoint.model_validate(body),
            checkpoint_id=CKPT,
            version=NEW,
            node="gpu-7",
            settings=RestoreSettings(),
        )


def test_the_name_is_one_per_version_and_a_valid_name() -> None:
    long = "a" * 39 + "-" + "b" * 30
    name = verification_pod_name(long, NEW)
    assert name == f"{'a' * 39}-verify-{name.rsplit('-', 1)[1]}"
    assert verification_pod_name("llama", NEW) != verification_pod_name("llama", READY)


# --- the status while it verifies --------------------------------------------------------


def _report(phase: Phase, reason: Reason = Reason.IN_PROGRESS, **fields: Any) -> Report:
    return Report(phase=phase, reason=reason, checkpoint_id=CKPT, **fields)


def test_the_status_names_the_verification_only_while_it_runs() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    named = VerifyingStatus.model_validate(VERIFYING)
    status = next_status(None, _report(Phase.CAPTURING), now=now)
    verifying = next_status(status, _report(Phase.UPLOADING, verifying=named), now=now)
    assert (verifying.phase, verifying.verifying, verifying.version) == (
        Phase.UPLOADING,
        named,
        "",  # the version is not offered while it is verified
    )
    ready = next_status(verifying, _report(Phase.READY, Reason.CAPTURED, version=NEW), now=now)
    assert (ready.phase, ready.version, ready.verifying) == (Phase.READY, NEW, None)
    failed = next_status(verifying, _report(Phase.FAILED, Reason.VERIFY_FAILED), now=now)
    assert (failed.phase, failed.verifying) == (Phase.FAILED, None)
    # A later run verifies beside the published version, which stays until it is Ready.
    later = next_status(ready, _report(Phase.UPLOADING, verifying=named, recapture=True), now=now)
    assert (later.phase, later.version, later.verifying) == (Phase.READY, NEW, named)
    lost = next_status(later, _report(Phase.FAILED, Reason.VERIFY_FAILED, recapture=True), now=now)
    assert (lost.phase, lost.version, lost.verifying) == (Phase.READY, NEW, None)
    # Published as a merge patch: `verifying` always, null taking it off.
    assert status_patch(verifying)["verifying"] == VERIFYING
    assert status_patch(failed)["verifying"] is None
