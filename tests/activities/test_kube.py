"""Control activities on a cluster: the real `kubernetes` client against an emulated API
server (kmock, taught resourceVersions and conflicts in tests/kube.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client
from temporalio.testing import ActivityEnvironment

from activities.contracts import (
    CatalogQuery,
    ClaimInput,
    ContainerTarget,
    JobInput,
    JobRef,
    NodeSelectorInput,
    PodQuery,
    ResourceRef,
    StatusInput,
)
from activities.kube.control import KubeControlActivities, in_use_references, ready_references
from activities.storage.catalog import LocalCatalog
from activities.storage.quarantine import NodeClass, Quarantine, QuarantineEvidence
from activities.storage.queries import CatalogActivities
from api.errors import (
    CheckpointNotFoundError,
    ForbiddenError,
    IdentityConflictError,
    InvalidSpecError,
    UnavailableError,
)
from api.reasons import Phase, Reason
from api.retention import ProtectedRef
from tests.kube import Cluster, start_cluster

CKPT = "96429b2725761a09"
VERSION = "20261127T120000Z-abcdef"
TEMPLATE = {"spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}]}}


def checkpoint(name: str = "llama", namespace: str = "inference") -> dict[str, Any]:
    return {
        "apiVersion": "warmstart.dev/v1alpha1",
        "kind": "Checkpoint",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "identity": {"model": "meta-llama/Llama-2-7b-hf", "backendFramework": "vllm"},
            "job": {"podTemplateSpec": TEMPLATE},
        },
    }


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async for running in start_cluster():
        yield running


@pytest.fixture
def control(cluster: Cluster) -> KubeControlActivities:
    return KubeControlActivities(
        cluster.api, claims_namespace="warmstart-system", ui_url="http://ui:8233"
    )


async def created(
    cluster: Cluster, name: str = "llama", *, namespace: str = "inference"
) -> ResourceRef:
    obj = await cluster.create("checkpoints", checkpoint(name, namespace))
    meta = obj["metadata"]
    return ResourceRef(kind="Checkpoint", namespace=meta["namespace"], name=name, uid=meta["uid"])


def claim(ref: ResourceRef) -> ClaimInput:
    return ClaimInput(checkpoint_id=CKPT, namespace=ref.namespace, name=ref.name, resource=ref)


def status(ref: ResourceRef, phase: Phase, reason: Reason, **more: Any) -> StatusInput:
    return StatusInput(
        kind="capture",
        namespace=ref.namespace,
        name=ref.name,
        phase=phase,
        reason=reason,
        checkpoint_id=CKPT,
        resource=ref,
        **more,
    )


async def test_a_checkpoint_id_has_one_owner_until_the_owner_is_deleted(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    env = ActivityEnvironment()
    first, second = await created(cluster, "llama"), await created(cluster, "llama-copy")
    await env.run(control.claim_checkpoint_id, claim(first))
    await env.run(control.claim_checkpoint_id, claim(first))  # again: still ours

    with pytest.raises(IdentityConflictError, match="already owned by Checkpoint inference/llama"):
        await env.run(control.claim_checkpoint_id, claim(second))

    await cluster.run(
        cluster.custom.delete_namespaced_custom_object,
        "warmstart.dev",
        "v1alpha1",
        "inference",
        "checkpoints",
        "llama",
    )
    await env.run(control.claim_checkpoint_id, claim(second))  # the owner's deletion frees it
    lease = await cluster.run(
        cluster.leases.read_namespaced_lease, f"checkpoint-inference-{CKPT}", "warmstart-system"
    )
    assert lease.spec.holder_identity == f"Checkpoint/inference/llama-copy/{second.uid}"


async def test_a_namespace_cannot_squat_another_namespaces_checkpoint_id(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    """The ID is a hash of the identity, the same in every namespace: a namespace that
    claims it first holds it in its own namespace only, and nothing it is told names
    another namespace's resources."""
    env = ActivityEnvironment()
    squatter = await created(cluster, "llama", namespace="team-b")
    await env.run(control.claim_checkpoint_id, claim(squatter))
    owner = await created(cluster, "llama")  # inference: its own claim of the same ID
    await env.run(control.claim_checkpoint_id, claim(owner))
    second = await created(cluster, "llama-2", namespace="team-b")
    with pytest.raises(IdentityConflictError) as conflict:
        await env.run(control.claim_checkpoint_id, claim(second))
    assert (
        str(conflict.value) == f"checkpoint ID {CKPT} is already owned by Checkpoint team-b/llama"
    )
    assert "inference" not in str(conflict.value)


async def test_a_claim_made_before_claims_were_per_namespace_binds_its_namespace_only(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    env = ActivityEnvironment()
    old = await created(cluster, "llama")
    holder = f"Checkpoint/inference/llama/{old.uid}"
    lease = {"metadata": {"name": f"checkpoint-{CKPT}"}, "spec": {"holderIdentity": holder}}
    await cluster.run(cluster.leases.create_namespaced_lease, "warmstart-system", lease)
    await env.run(control.claim_checkpoint_id, claim(old))  # its own: still its own
    with pytest.raises(IdentityConflictError, match=r"owned by Checkpoint inference/llama$"):
        await env.run(control.claim_checkpoint_id, claim(await created(cluster, "llama-2")))
    elsewhere = await created(cluster, "llama", namespace="team-b")
    before = _requests(cluster)
    await env.run(control.claim_checkpoint_id, claim(elsewhere))  # another namespace's: none
    read = _requests(cluster)[len(before) :]
    assert not any("/namespaces/inference/" in path for path in read)  # not even looked at


def _requests(cluster: Cluster) -> list[str]:
    assert cluster.emulator is not None
    return [str(r.url.path) for r in cluster.emulator if str(r.method.value) == "GET"]


async def test_status_conditions_link_and_events(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    env = ActivityEnvironment()
    ref = await created(cluster)
    await env.run(
        control.publish_status,
        status(ref, Phase.CAPTURING, Reason.CAPTURED, job_name="llama-96429b2725761a09"),
    )
    await env.run(
        control.publish_status,
        status(
            ref,
            Phase.READY,
            Reason.CAPTURED,
            node="gpu-1",
            version=VERSION,
            size_bytes=42,
            storage_uri="file:///checkpoints/x",
            manifest_sha256="ab" * 32,
            step_seconds={"dump": 1.5},
        ),
    )
    st = (await cluster.get("checkpoints", "inference", "llama"))["status"]
    assert st["manifestSHA256"] == "ab" * 32
    assert (st["phase"], st["checkpointID"], st["nodeName"]) == ("Ready", CKPT, "gpu-1")
    assert (st["jobName"], st["sizeBytes"], st["version"]) == (
        "llama-96429b2725761a09",
        42,
        VERSION,
    )
    assert st["stepSeconds"] == {"dump": 1.5}
    conditions = {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}
    assert conditions == {
        "JobCreated": ("True", "JobCreated"),
        "Captured": ("True", "Captured"),
        "Uploaded": ("True", "Captured"),
        "Ready": ("True", "Captured"),
    }
    assert st["workflow"]["id"] == "test"
    assert st["workflow"]["url"].startswith("http://ui:8233/namespaces/default/workflows/test/")
    events = (await cluster.run(cluster.events.list_namespaced_event, "inference")).items
    assert [(e.type, e.reason) for e in events] == [
        ("Normal", "CaptureStarted"),
        ("Normal", "CaptureSucceeded"),
    ]
    assert all(e.regarding.uid == ref.uid for e in events)


async def test_failed_is_sticky_and_says_why(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    env = ActivityEnvironment()
    ref = await created(cluster)
    failed = status(ref, Phase.FAILED, Reason.NODE_LOST, message="node gpu-1: worker gone")
    await env.run(control.publish_status, failed)
    await env.run(control.publish_status, status(ref, Phase.READY, Reason.CAPTURED))
    st = (await cluster.get("checkpoints", "inference", "llama"))["status"]
    assert (st["phase"], st["message"]) == ("Failed", "node gpu-1: worker gone")
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NodeLost")
    events = (await cluster.run(cluster.events.list_namespaced_event, "inference")).items
    assert [(e.type, e.reason, e.note) for e in events] == [
        ("Warning", "CaptureFailed", "node gpu-1: worker gone")
    ]


async def test_a_status_patch_that_conflicts_reads_again(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    ref = await created(cluster)
    assert cluster.emulator is not None
    cluster.emulator.conflicts = 3  # three concurrent writers in a row
    await ActivityEnvironment().run(
        control.publish_status, status(ref, Phase.CAPTURING, Reason.CAPTURED)
    )
    assert (await cluster.get("checkpoints", "inference", "llama"))["status"][
        "phase"
    ] == "Capturing"
    assert cluster.emulator.conflicts == 0


async def test_a_resource_created_again_is_not_the_one_the_capture_works_for(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    ref = await created(cluster)
    stale = ref.model_copy(update={"uid": "an-earlier-uid"})
    with pytest.raises(CheckpointNotFoundError, match="created again"):
        await ActivityEnvironment().run(
            control.publish_status, status(stale, Phase.READY, Reason.CAPTURED)
        )


async def test_the_capture_job_is_created_once_and_adopted_after(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    env = ActivityEnvironment()
    ref = await created(cluster)
    name = await env.run(control.create_capture_job, JobInput(resource=ref, version=VERSION))
    again = await env.run(control.create_capture_job, JobInput(resource=ref, version=VERSION))
    assert name == again == "llama-96429b2725761a09"
    job = await cluster.run(cluster.batch.read_namespaced_job, name, "inference")
    assert job.spec.backoff_limit == 0
    assert job.metadata.owner_references[0].uid == ref.uid
    assert job.spec.template.spec.containers[0].readiness_probe._exec.command[0] == "cat"

    await env.run(control.delete_capture_job, JobRef(namespace="inference", name=name))
    await env.run(control.delete_capture_job, JobRef(namespace="inference", name=name))
    # A Job of that name that another resource owns is not adopted.
    foreign = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": "inference",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Checkpoint", "name": "x", "uid": "someone-else"}
            ],
        },
        "spec": {"template": {"spec": {"containers": [{"name": "main", "image": "i"}]}}},
    }
    await cluster.run(cluster.batch.create_namespaced_job, "inference", foreign)
    with pytest.raises(InvalidSpecError, match="is not this Checkpoint's"):
        await env.run(control.create_capture_job, JobInput(resource=ref, version=VERSION))


def pod(node: str, *, ready: bool, exit_code: int | None = None) -> dict[str, Any]:
    state = (
        {"running": {}}
        if exit_code is None
        else {"terminated": {"exitCode": exit_code, "reason": "Error"}}
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "llama-job-abcde",
            "namespace": "inference",
            "labels": {"job-name": "j"},
        },
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "i"}]},
        "status": {
            "containerStatuses": [
                {
                    "name": "main",
                    "ready": ready,
                    "state": state,
                    "image": "i",
                    "imageID": "",
                    "restartCount": 0,
                }
            ]
        },
    }


async def test_the_capture_pod_is_read_when_a_signal_was_missed(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    env = ActivityEnvironment()
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j", "namespace": "inference"},
        "spec": {"template": {"spec": {"containers": [{"name": "main", "image": "i"}]}}},
    }
    await cluster.run(cluster.batch.create_namespaced_job, "inference", job)
    query = PodQuery(namespace="inference", job_name="j", container="main")
    assert (await env.run(control.read_capture_pod, query)).pod_name == ""  # not created yet

    await cluster.run(cluster.core.create_namespaced_pod, "inference", pod("gpu-7", ready=True))
    seen = await env.run(control.read_capture_pod, query)
    assert (seen.node_name, seen.container_ready, seen.failure) == ("gpu-7", True, "")

    await cluster.run(cluster.core.delete_namespaced_pod, "llama-job-abcde", "inference")
    await cluster.run(
        cluster.core.create_namespaced_pod, "inference", pod("gpu-7", ready=False, exit_code=3)
    )
    seen = await env.run(control.read_capture_pod, query)
    assert seen.failure == "container main exited with code 3 (Error)"


async def test_a_failed_job_is_reported_with_its_reason(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "j", "namespace": "inference"},
        "spec": {"template": {"spec": {"containers": [{"name": "main", "image": "i"}]}}},
        "status": {
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "DeadlineExceeded",
                    "message": "Job was active longer than specified deadline",
                }
            ]
        },
    }
    await cluster.run(cluster.batch.create_namespaced_job, "inference", job)
    seen = await ActivityEnvironment().run(
        control.read_capture_pod, PodQuery(namespace="inference", job_name="j", container="main")
    )
    assert seen.failure.startswith("Job j failed: DeadlineExceeded: Job was active longer")


async def test_a_pod_snapshot_of_a_pod_created_again_is_refused(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    env = ActivityEnvironment()
    await cluster.run(cluster.core.create_namespaced_pod, "inference", pod("gpu-2", ready=True))
    live = await cluster.run(cluster.core.read_namespaced_pod, "llama-job-abcde", "inference")
    query = PodQuery(
        namespace="inference",
        container="main",
        pod_name="llama-job-abcde",
        pod_uid=live.metadata.uid,
    )
    seen = await env.run(control.read_capture_pod, query)
    assert (seen.node_name, seen.container_ready, seen.failure) == ("gpu-2", True, "")

    stale = query.model_copy(update={"pod_uid": "uid-of-an-earlier-pod"})
    seen = await env.run(control.read_capture_pod, stale)
    assert seen.failure.startswith("pod inference/llama-job-abcde was created again (UID ")
    gone = query.model_copy(update={"pod_name": "no-such-pod"})
    assert (await env.run(control.read_capture_pod, gone)).failure == (
        "pod inference/no-such-pod no longer exists"
    )


@pytest.mark.parametrize(
    ("phase", "reason", "annotation", "event"),
    [
        (Phase.RESTORED, Reason.RESTORED, "restored", ("Normal", "Restored")),
        (
            Phase.FELL_BACK,
            Reason.INCOMPATIBLE,
            "fell-back: Incompatible: needs 2 GPU(s)",
            ("Warning", "RestoreFellBack"),
        ),
    ],
)
async def test_a_restore_is_published_on_its_pod(
    cluster: Cluster,
    control: KubeControlActivities,
    phase: Phase,
    reason: Reason,
    annotation: str,
    event: tuple[str, str],
) -> None:
    body = pod("gpu-1", ready=False)
    body["metadata"]["name"] = "llama-0"
    await cluster.run(cluster.core.create_namespaced_pod, "inference", body)
    created = await cluster.run(cluster.core.read_namespaced_pod, "llama-0", "inference")
    target = ContainerTarget(
        namespace="inference", pod_name="llama-0", pod_uid=created.metadata.uid, container="main"
    )
    message = "" if phase == Phase.RESTORED else "needs 2 GPU(s)"
    report = StatusInput(
        kind="restore",
        namespace="inference",
        name="llama-0",
        phase=phase,
        reason=reason,
        message=message,
        checkpoint_id=CKPT,
        pod=target,
    )

    await ActivityEnvironment().run(control.publish_status, report)

    after = await cluster.run(cluster.core.read_namespaced_pod, "llama-0", "inference")
    assert after.metadata.annotations["warmstart.dev/restore-status"] == annotation
    events = (await cluster.run(cluster.events.list_namespaced_event, "inference")).items
    assert [(e.type, e.reason, e.regarding.uid) for e in events] == [(*event, created.metadata.uid)]


async def test_the_restore_of_a_deleted_pod_is_not_published(
    control: KubeControlActivities,
) -> None:
    gone = ContainerTarget(namespace="inference", pod_name="gone", pod_uid="u", container="main")
    report = StatusInput(
        kind="restore",
        namespace="inference",
        name="gone",
        phase=Phase.RESTORED,
        reason=Reason.RESTORED,
        pod=gone,
    )
    await ActivityEnvironment().run(control.publish_status, report)


async def test_nodes_matching_any_selector_are_found(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    nodes = {
        "gpu-a": {"nvidia.com/gpu.product": "H100", "zone": "a"},
        "gpu-b": {"nvidia.com/gpu.product": "H100", "zone": "b"},
        "gpu-c": {"nvidia.com/gpu.product": "A100", "zone": "a"},
        "cpu-1": {},
    }
    core = client.CoreV1Api(cluster.api)
    for name, labels in nodes.items():
        await cluster.run(core.create_node, {"metadata": {"name": name, "labels": labels}})
    env = ActivityEnvironment()
    h100_in_a = NodeSelectorInput(selectors=[{"nvidia.com/gpu.product": "H100", "zone": "a"}])
    assert await env.run(control.nodes_matching, h100_in_a) == ["gpu-a"]
    either = NodeSelectorInput(selectors=[{"zone": "b"}, {"nvidia.com/gpu.product": "A100"}])
    assert await env.run(control.nodes_matching, either) == ["gpu-b", "gpu-c"]
    none = NodeSelectorInput(selectors=[{"zone": "c"}])
    assert await env.run(control.nodes_matching, none) == []


async def test_retention_keeps_what_ready_resources_reference(cluster: Cluster) -> None:
    ready = checkpoint("llama")
    ready["status"] = {"phase": "Ready", "checkpointID": CKPT, "version": VERSION}
    capturing = checkpoint("qwen", namespace="team-b")
    capturing["status"] = {"phase": "Capturing", "checkpointID": "0123456789abcdef"}
    for body in (ready, capturing):
        await cluster.create("checkpoints", body)
    refs = await ready_references(cluster.api)()
    assert refs == [
        ProtectedRef(checkpoint_id=CKPT, version=VERSION, referrer="Checkpoint inference/llama")
    ]


async def test_retention_keeps_what_admitted_restore_targets_wait_for(cluster: Cluster) -> None:
    def target(name: str, version: str, **notes: str) -> dict[str, Any]:
        """A pod as the webhook admitted it to restore `version` (tests/kube.py: no phase)."""
        return {
            "metadata": {
                "name": name,
                "namespace": "inference",
                "labels": {
                    "warmstart.dev/restore-target": "true",
                    "warmstart.dev/checkpoint-id": CKPT,
                },
                "annotations": {"warmstart.dev/checkpoint-version": version, **notes},
            },
            "spec": {"containers": [{"name": "main", "image": "vllm/vllm-openai:v0.8.0"}]},
        }

    older = "20261120T120000Z-000000"
    waiting = target("llama-0", older)  # not scheduled yet: no restore has started
    done = target("llama-1", VERSION, **{"warmstart.dev/restore-status": "restored"})
    plain = {
        "metadata": {"name": "web", "namespace": "inference"},
        "spec": {"containers": [{"name": "main", "image": "nginx"}]},
    }
    for pod in (waiting, done, plain):
        await cluster.run(cluster.core.create_namespaced_pod, "inference", pod)

    assert await in_use_references(cluster.api)() == [
        ProtectedRef(
            checkpoint_id=CKPT, version=older, referrer="restore-target pod inference/llama-0"
        )
    ]


async def test_the_quarantine_in_effect_shows_on_the_status_until_cleared(
    cluster: Cluster, tmp_path: Path
) -> None:
    quarantine = Quarantine(tmp_path)
    now = datetime.now(UTC)
    h100 = NodeClass(gpu_model="H100", gpu_driver="560", criu="4.2.1")
    a100 = h100.model_copy(update={"gpu_model": "A100"})
    for node, cls in (("gpu-1", h100), ("gpu-2", h100), ("gpu-3", a100)):
        quarantine.record(
            QuarantineEvidence(
                checkpoint_id=CKPT,
                version=VERSION,
                node_class=cls,
                node=node,
                reason="RestoreFailed",
                message="criu restore exited with 1",
                since=now,
                last=now,
            )
        )
    control = KubeControlActivities(
        cluster.api, claims_namespace="warmstart-system", quarantine=quarantine
    )
    env = ActivityEnvironment()
    # Labelled with its checkpoint ID, as the watcher labels every resource it captures.
    body = checkpoint()
    body["metadata"]["labels"] = {"warmstart.dev/checkpoint-id": CKPT}
    meta = (await cluster.create("checkpoints", body))["metadata"]
    ref = ResourceRef(kind="Checkpoint", namespace="inference", name="llama", uid=meta["uid"])
    # A capture's status publish shows the quarantine in effect (not the pending A100).
    ready = status(ref, Phase.READY, Reason.CAPTURED, version=VERSION)
    await env.run(control.publish_status, ready)
    [shown] = (await cluster.get("checkpoints", "inference", "llama"))["status"]["quarantine"]
    assert shown["version"] == VERSION
    assert shown["nodeClass"] == "H100, driver 560, CRIU 4.2.1"
    assert (shown["nodes"], shown["reason"]) == (["gpu-1", "gpu-2"], "RestoreFailed")
    assert shown["expires"].startswith(f"{now + timedelta(hours=24):%Y-%m-%dT%H:%M}")

    # `warmstart quarantine clear` on the control side: the status shows none.
    answers = CatalogActivities(
        catalog=LocalCatalog(tmp_path),
        quarantine=quarantine,
        on_cleared=control.publish_quarantine,
    )
    clear = CatalogQuery(action="clear-quarantine", ref=CKPT)
    cleared = await env.run(answers.answer_catalog, clear)
    assert len(cleared.quarantine) == 2
    st = (await cluster.get("checkpoints", "inference", "llama"))["status"]
    assert (st["phase"], st["quarantine"]) == ("Ready", [])


def refuse(cluster: Cluster, request: str, status: int, *, times: int | None = None) -> None:
    """The API server answers `request` ("verb /path") with `status` (the next `times`)."""
    assert cluster.emulator is not None
    body = {"kind": "Status", "apiVersion": "v1", "code": status, "reason": f"Status{status}"}
    view = cluster.emulator[request]
    (view if times is None else view[:times]) << status << body


async def test_a_forbidden_job_says_what_was_forbidden_and_is_not_retried(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    ref = await created(cluster)
    refuse(cluster, "post /apis/batch/v1/namespaces/inference/jobs", 403)
    with pytest.raises(ForbiddenError) as raised:
        await ActivityEnvironment().run(
            control.create_capture_job, JobInput(resource=ref, version=VERSION)
        )
    assert not raised.value.retryable and raised.value.reason == Reason.FORBIDDEN
    assert raised.value.message.startswith(
        "forbidden (403): this worker may not create Job inference/llama-96429b2725761a09"
    )


async def test_an_api_server_away_is_retried_by_the_steps_policy(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    ref = await created(cluster)
    refuse(cluster, "get /apis/warmstart.dev/v1alpha1/namespaces/inference/checkpoints/llama", 503)
    with pytest.raises(UnavailableError) as raised:
        await ActivityEnvironment().run(
            control.publish_status, status(ref, Phase.CAPTURING, Reason.CAPTURED)
        )
    assert raised.value.retryable
    assert raised.value.message == (
        "read Checkpoint inference/llama: API server answered 503 Status503"
    )


async def test_an_event_the_api_server_refuses_does_not_fail_the_status(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    ref = await created(cluster)
    refuse(cluster, "post /apis/events.k8s.io/v1/namespaces/inference/events", 503)
    await ActivityEnvironment().run(
        control.publish_status, status(ref, Phase.CAPTURING, Reason.CAPTURED)
    )
    st = (await cluster.get("checkpoints", "inference", "llama"))["status"]
    assert st["phase"] == "Capturing"


async def test_a_capture_job_that_is_gone_is_an_observation(
    cluster: Cluster, control: KubeControlActivities
) -> None:
    query = PodQuery(namespace="inference", job_name="deleted-job", container="main")
    seen = await ActivityEnvironment().run(control.read_capture_pod, query)
    assert seen.failure == "Job inference/deleted-job no longer exists"
