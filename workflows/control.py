"""Control-queue steps both workflows take: publishing the pipeline's status."""

from __future__ import annotations

from typing import Protocol

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.contracts import ContainerTarget, PipelineKind, ResourceRef, StatusInput
    from activities.steps import ControlSteps
    from api.reasons import Phase, Reason
    from api.resources import VerifyingStatus
    from workflows import policies
    from workflows.visibility import PipelineState


class _Pipeline(Protocol):
    """What capture and restore requests have in common."""

    @property
    def namespace(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def checkpoint_id(self) -> str: ...
    @property
    def node(self) -> str: ...
    @property
    def control_task_queue(self) -> str: ...


async def publish_status(
    kind: PipelineKind,
    request: _Pipeline,
    state: PipelineState,
    phase: Phase,
    reason: Reason,
    *,
    message: str = "",
    committed: bool = True,
    storage_uri: str = "",
    size_bytes: int = 0,
    manifest_sha256: str = "",
    resource: ResourceRef | None = None,
    job_name: str = "",
    pod: ContainerTarget | None = None,
    recapture: bool = False,
    verifying: VerifyingStatus | None = None,
) -> None:
    """Publish where the pipeline stands (the resource's status on a cluster); the version
    is named only where `committed` (a failed capture has none)."""
    status = StatusInput(
        kind=kind,
        namespace=request.namespace,
        name=request.name,
        phase=phase,
        reason=reason,
        message=message,
        checkpoint_id=request.checkpoint_id,
        version=state.version if committed else "",
        node=state.node or request.node,
        storage_uri=storage_uri,
        size_bytes=size_bytes,
        manifest_sha256=manifest_sha256,
        step_seconds=dict(state.clock.seconds),
        resource=resource,
        job_name=job_name,
        pod=pod,
        recapture=recapture,
        verifying=verifying,
    )
    await workflow.execute_activity_method(
        ControlSteps.publish_status,
        status,
        task_queue=request.control_task_queue,
        start_to_close_timeout=policies.CONTROL.start_to_close,
        retry_policy=policies.CONTROL.retry,
        summary=f"publish {phase.value}",
    )
