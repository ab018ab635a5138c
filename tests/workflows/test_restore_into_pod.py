"""RestoreWorkflow for a restore-target pod, with stand-in activities: the node restores
into the standby container, the pod is told after; any failure (a timed-out node step
included) writes `restore-failed` so the standby starts cold."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from activities.contracts import (
    ContainerRestoreInput,
    ContainerSentinelInput,
    ContainerTarget,
    RestoredContainer,
    StatusInput,
)
from api.naming import node_task_queue
from api.reasons import Phase, Reason, Sentinel
from workflows.contracts import Refusal, RestoreRequest
from workflows.policies import container_restore_options
from workflows.restore import RestoreWorkflow

CKPT = "96429b2725761a09"
POD = ContainerTarget(namespace="inference", pod_name="llama-0", pod_uid="u-1", container="main")


async def _run(
    client: Client,
    restore_fn: object,
    *,
    deadline: float = 60,
    pod: ContainerTarget = POD,
    steps: list[str] | None = None,
    refusal: Refusal | None = None,
) -> tuple[list[StatusInput], list[ContainerSentinelInput], object]:
    """`steps`: gets each stand-in's name as it runs, in order."""
    statuses: list[StatusInput] = []
    sentinels: list[ContainerSentinelInput] = []
    ran = steps if steps is not None else []

    @activity.defn(name="publish_status")
    async def publish(request: StatusInput) -> None:
        ran.append("publish_status")
        statuses.append(request)

    @activity.defn(name="write_container_sentinel")
    async def sentinel(request: ContainerSentinelInput) -> None:
        ran.append("write_container_sentinel")
        sentinels.append(request)

    @activity.defn(name="stop_standby")
    async def stop(request: ContainerTarget) -> None:
        assert request == pod
        ran.append("stop_standby")

    suffix = uuid.uuid4().hex[:8]
    node, control = f"node-{suffix}", f"control-{suffix}"
    request = RestoreRequest(
        namespace=POD.namespace,
        name=POD.pod_name,
        checkpoint_id="" if refusal else CKPT,
        refusal=refusal,
        node=node,
        control_task_queue=control,
        deadline_seconds=deadline,
        pod=pod,
        gms_sentinel="gms-load-complete-u-1",
    )
    async with (
        Worker(client, task_queue=control, activities=[publish]),
        Worker(
            client,
            task_queue=node_task_queue(node),
            workflows=[RestoreWorkflow],
            activities=[restore_fn, sentinel, stop],
        ),
    ):
        handle = await client.start_workflow(
            RestoreWorkflow.run,
            request,
            id=f"restore/{POD.namespace}/{POD.pod_name}/{suffix}",
            task_queue=node_task_queue(node),
        )
        try:
            return statuses, sentinels, await handle.result()
        except WorkflowFailureError as err:
            return statuses, sentinels, err


async def test_the_pod_is_told_after_the_workload_runs(client: Client) -> None:
    seen: list[ContainerRestoreInput] = []

    @activity.defn(name="restore_container")
    async def restore(request: ContainerRestoreInput) -> RestoredContainer:
        seen.append(request)
        stages = {"verify": 0.001, "criu-restore": 0.05}
        return RestoredContainer(pid=4242, namespace_pid=7, version="v1", stage_seconds=stages)

    statuses, sentinels, result = await _run(client, restore)
    assert getattr(result, "pid", None) == 4242
    assert [(r.target, r.checkpoint_id, r.gms_sentinel) for r in seen] == [
        (POD, CKPT, "gms-load-complete-u-1")
    ]
    [status] = statuses
    assert (status.kind, status.phase, status.pod, status.version) == (
        "restore",
        Phase.RESTORED,
        POD,
        "v1",
    )
    assert sentinels == []  # the node wrote restore-complete itself


async def test_a_failed_restore_falls_back_to_a_cold_start(client: Client) -> None:
    @activity.defn(name="restore_container")
    async def restore(request: ContainerRestoreInput) -> RestoredContainer:
        message = "needs GPU model NVIDIA H100"
        raise ApplicationError(message, type="Incompatible", non_retryable=True)

    statuses, sentinels, err = await _run(client, restore)
    assert isinstance(err, WorkflowFailureError)
    assert isinstance(err.cause, ApplicationError) and err.cause.type == "Incompatible"
    [sentinel] = sentinels
    assert (sentinel.target, sentinel.sentinel) == (POD, Sentinel.RESTORE_FAILED)
    assert sentinel.content == "Incompatible: needs GPU model NVIDIA H100"
    [status] = statuses
    assert (status.phase, status.reason, status.pod) == (Phase.FELL_BACK, "Incompatible", POD)


async def test_an_image_standby_is_turned_off_then_stopped_after_a_failure(
    client: Client,
) -> None:
    """The image's own (Dynamo) standby cannot start cold in place: once the pod's
    annotations turn it off (published with the status), the node stops it and the kubelet
    restarts the container cold. warmstart's own standby is never stopped."""

    @activity.defn(name="restore_container")
    async def restore(request: ContainerRestoreInput) -> RestoredContainer:
        raise ApplicationError("criu restore exited with 1", type="RestoreFailed")

    image = POD.model_copy(update={"standby": "image"})
    steps: list[str] = []
    statuses, _, err = await _run(client, restore, pod=image, steps=steps)
    assert isinstance(err, WorkflowFailureError)
    assert steps == ["write_container_sentinel", "publish_status", "stop_standby"]
    assert statuses[0].pod == image
    ours: list[str] = []
    await _run(client, restore, steps=ours)
    assert ours == ["write_container_sentinel", "publish_status"]


async def test_a_node_step_past_its_deadline_still_starts_the_pod_cold(client: Client) -> None:
    @activity.defn(name="restore_container")
    async def restore(request: ContainerRestoreInput) -> RestoredContainer:
        # A node step slower than the pod's deadline (it ends by itself soon after, so
        # that no activity is left running when the test's worker stops).
        await asyncio.sleep(3)
        raise AssertionError("the workflow gave up on this step already")

    assert container_restore_options(1).start_to_close == timedelta(seconds=1)
    statuses, sentinels, err = await _run(client, restore, deadline=1)
    assert isinstance(err, WorkflowFailureError)
    [sentinel] = sentinels
    assert sentinel.sentinel == Sentinel.RESTORE_FAILED
    assert [s.phase for s in statuses] == [Phase.FELL_BACK]


async def test_a_refused_pod_starts_cold_and_nothing_is_restored(client: Client) -> None:
    """The node refused the pod (its claims are not its Checkpoint's): no restore step, the
    standby told to start cold, the pod told why; an image's own standby is stopped too."""

    @activity.defn(name="restore_container")
    async def restore(request: ContainerRestoreInput) -> RestoredContainer:
        raise AssertionError("a refused pod is never restored")

    why = Refusal(reason=Reason.FORBIDDEN, message="the pod names no Checkpoint")
    for pod, after in ((POD, []), (POD.model_copy(update={"standby": "image"}), ["stop_standby"])):
        steps: list[str] = []
        statuses, sentinels, err = await _run(client, restore, pod=pod, steps=steps, refusal=why)
        assert isinstance(err, WorkflowFailureError)
        assert isinstance(err.cause, ApplicationError) and err.cause.type == "Forbidden"
        assert steps == ["write_container_sentinel", "publish_status", *after]
        [sentinel] = sentinels
        assert sentinel.content == "Forbidden: the pod names no Checkpoint"
        [status] = statuses
        assert (status.phase, status.reason, status.message, status.checkpoint_id) == (
            Phase.FELL_BACK,
            Reason.FORBIDDEN,
            "the pod names no Checkpoint",
            "",
        )
