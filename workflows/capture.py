"""CaptureWorkflow: make a checkpoint of a warmed-up workload, a local process or a pod's
container (the request's `source`, one type per mode); both end with the same dump → commit
→ `snapshot-complete` steps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, WorkflowAlreadyStartedError
from temporalio.workflow import ActivityCancellationType, ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.contracts import (
        AwaitReadyInput,
        ClaimInput,
        CommitInput,
        CommitResult,
        ContainerCommitInput,
        ContainerDumpInput,
        ContainerSentinelInput,
        ContainerTarget,
        DiscardInput,
        DumpInput,
        GmsSavedInput,
        JobInput,
        JobRef,
        LaunchInput,
        LaunchResult,
        NodeSelectorInput,
        PodObservation,
        PodQuery,
        ReleaseInput,
        RemoteStorage,
        SentinelInput,
        StopInput,
        UploadInput,
        VerificationObservation,
        VerificationPod,
        VerificationPodInput,
        VerificationQuery,
        VerifyInput,
    )
    from activities.errors import application_error
    from activities.steps import (
        ClusterControlSteps,
        ContainerSteps,
        ControlSteps,
        DumpSteps,
        LocalProcessSteps,
        SentinelSteps,
        StorageSteps,
        VerifySteps,
    )
    from api.errors import PipelineFailedError
    from api.naming import CAPTURE_WORKFLOW, PROGRESS_QUERY, checkpoint_version, node_task_queue
    from api.reasons import Phase, Reason, Sentinel
    from api.resources import VerifyingStatus
    from workflows import policies, visibility
    from workflows.contracts import (
        CaptureRequest,
        CaptureResult,
        ClusterCapture,
        LocalCapture,
        PrefetchRequest,
        Progress,
    )
    from workflows.control import publish_status
    from workflows.prefetch import PrefetchWorkflow
    from workflows.visibility import PipelineState

STOP_UNCONFIRMED_LAUNCH = "stop-unconfirmed-launch"
S = TypeVar("S")
I = TypeVar("I")  # noqa: E741
R = TypeVar("R")


@dataclass(frozen=True)
class _Call(Generic[I, R]):
    """One node step of a capture mode: its declaration, its input and its summary."""

    step: Callable[[Any, I], Awaitable[R]]
    arg: I
    summary: str


@dataclass(frozen=True)
class _Finish:
    """How a capture mode dumps, commits and ends its workload (`complete` None: the
    source keeps serving)."""

    dump: _Call[Any, None]
    commit: _Call[Any, CommitResult]
    complete: _Call[Any, None] | None


@workflow.defn(name=CAPTURE_WORKFLOW, failure_exception_types=policies.FAILING_EXCEPTIONS)
class CaptureWorkflow:
    def __init__(self) -> None:
        self._state = PipelineState()
        self._clock = self._state.clock
        self._request: CaptureRequest | None = None
        self._seen = PodObservation()
        self._launch: LaunchResult | None = None
        self._launched = self._staged = self._succeeded = False
        self._held = False  # a committed version held back until its test restore answers
        self._job = ""
        self._dropped = False
        self._verification: VerificationQuery | None = None  # a verification pod to delete
        # The watcher's latest word on the verification pod, and how many it sent.
        self._verification_seen = VerificationObservation()
        self._verification_signals = 0

    @workflow.query(name=PROGRESS_QUERY)
    def progress(self) -> Progress:
        return self._state.progress()

    @workflow.signal
    def pod_scheduled(self, seen: PodObservation) -> None:
        """The watcher saw the capture pod bound to a node."""
        self._observe(seen)

    @workflow.signal
    def container_ready(self, seen: PodObservation) -> None:
        """The watcher saw the target container Ready (it wrote `ready-for-snapshot`)."""
        self._observe(seen)

    @workflow.signal
    def pod_failed(self, seen: PodObservation) -> None:
        """The watcher saw a container of the capture pod fail, or the Job fail."""
        self._observe(seen)

    @workflow.signal
    def verification_seen(self, seen: VerificationObservation) -> None:
        """The watcher saw the verification pod change (restore status, readiness, an end);
        a signal of any other pod is ignored."""
        query = self._verification
        if query is not None and seen.pod_uid == query.uid:
            self._verification_seen = seen
            self._verification_signals += 1

    def _observe(self, seen: PodObservation) -> None:
        old = self._seen
        self._seen = PodObservation(
            pod_name=seen.pod_name or old.pod_name,
            pod_uid=seen.pod_uid or old.pod_uid,
            node_name=seen.node_name or old.node_name,
            container_ready=seen.container_ready or old.container_ready,
            failure=old.failure or seen.failure,
        )

    @workflow.run
    async def run(self, request: CaptureRequest) -> CaptureResult:
        self._request = request
        self._state.checkpoint_id, self._state.node = request.checkpoint_id, request.node
        visibility.index(
            namespace=request.namespace, checkpoint_id=request.checkpoint_id, node=request.node
        )
        version = checkpoint_version(workflow.now(), workflow.uuid4().hex)
        self._state.version = version
        try:
            source = request.source
            if isinstance(source, LocalCapture):
                finish = await self._local_steps(request, source, version)
            else:
                finish = await self._cluster_steps(request, source, version)
            commit = await self._dump_commit_complete(finish)
            if request.verify and isinstance(request.source, ClusterCapture):
                await self._verify_in_pod(request.source, version, commit.manifest_sha256)
            elif request.verify:
                await self._verify(version)
            if request.storage is not None:
                uploaded = await self._upload(request.storage, version)
                commit = uploaded.model_copy(update={"manifest_sha256": commit.manifest_sha256})
            self._clock.begin("publish")
            await self._publish(Phase.READY, Reason.CAPTURED, commit=commit)
            self._clock.settle(Phase.READY, "done")
            self._succeeded = True
            if request.storage is not None and request.prefetch_node_selectors:
                await self._warm_nodes(request.storage, version)
        except ActivityError as err:
            failure = policies.step_failure(err, node=self._state.node)
            await self._fail(failure)
            if failure.reason == Reason.CANCELLED:
                raise asyncio.CancelledError(failure.message) from err
            raise application_error(failure) from None
        except PipelineFailedError as failure:  # found by the workflow itself (waits)
            await self._fail(failure)
            raise application_error(failure) from None
        except asyncio.CancelledError:
            await self._fail(PipelineFailedError("cancelled", reason=Reason.CANCELLED))
            raise
        except GeneratorExit:
            # A worker that stopped with this run in its cache drops the coroutine; the
            # run goes on elsewhere, so nothing is cleaned up here (no workflow calls can
            # be made outside its event loop anyway). Never raised while the run executes.
            self._dropped = True
            raise
        finally:
            if not self._dropped:
                await self._cleanup()
        return CaptureResult(
            checkpoint_id=request.checkpoint_id,
            version=version,
            node=self._state.node,
            storage_uri=commit.storage_uri,
            size_bytes=commit.size_bytes,
            step_seconds=dict(self._clock.seconds),
        )

    async def _local_steps(
        self, request: CaptureRequest, source: LocalCapture, version: str
    ) -> _Finish:
        """Launch the workload on this host's node worker and await it; then its dump,
        commit and `snapshot-complete` by PID and workload name."""
        workload, ckpt = source.workload, request.checkpoint_id
        self._clock.begin("claim", Phase.CREATING)
        claim = ClaimInput(checkpoint_id=ckpt, namespace=request.namespace, name=request.name)
        await self._control(ControlSteps.claim_checkpoint_id, claim, "claim checkpoint ID")

        self._clock.begin("launch")
        self._launched = True  # from here on a workload may run: cleanup stops it
        self._launch = launch = await self._node(
            LocalProcessSteps.launch_workload,
            LaunchInput(workload=workload, checkpoint_id=ckpt),
            policies.LAUNCH,
            f"launch {workload.name}",
            # A cancel waits for the launch to end, so cleanup finds what it started.
            cancellation=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )

        self._clock.begin("await-ready", Phase.CAPTURING)
        await self._node(
            LocalProcessSteps.await_workload_ready,
            AwaitReadyInput(workload=workload, checkpoint_id=ckpt, pid=launch.pid),
            policies.await_ready_options(workload.ready_timeout_seconds),
            f"await {workload.readiness.kind} readiness",
        )
        complete = SentinelInput(
            checkpoint_id=ckpt, name=request.name, sentinel=Sentinel.SNAPSHOT_COMPLETE
        )
        return _Finish(
            dump=_Call(
                DumpSteps.dump_checkpoint,
                DumpInput(
                    checkpoint_id=ckpt,
                    version=version,
                    name=request.name,
                    pid=launch.pid,
                    leave_running=source.leave_running,
                ),
                f"criu dump pid {launch.pid}",
            ),
            commit=_Call(
                StorageSteps.commit_checkpoint,
                CommitInput(
                    checkpoint_id=ckpt,
                    version=version,
                    identity=request.identity,
                    namespace=request.namespace,
                    name=request.name,
                    unverified=request.verify,
                ),
                f"commit version {version}",
            ),
            complete=None
            if source.keeps_serving
            else _Call(SentinelSteps.write_sentinel, complete, "write snapshot-complete"),
        )

    async def _cluster_steps(
        self, request: CaptureRequest, source: ClusterCapture, version: str
    ) -> _Finish:
        """Job (Checkpoint) → pod scheduled → container ready → GMS save; then its dump,
        commit and `snapshot-complete` (the Job's workload then exits) on the pod's node."""
        ref, target, ckpt = source.resource, source.target, request.checkpoint_id
        deadline = workflow.now() + timedelta(seconds=target.deadline_seconds)
        self._clock.begin("claim", Phase.CREATING)
        claim = ClaimInput(
            checkpoint_id=ckpt, namespace=request.namespace, name=request.name, resource=ref
        )
        await self._control(ControlSteps.claim_checkpoint_id, claim, "claim checkpoint ID")
        await self._publish(Phase.CREATING, Reason.IN_PROGRESS)

        if ref.kind == "Checkpoint":
            self._clock.begin("create-job")
            self._job = await self._control(
                ClusterControlSteps.create_capture_job,
                JobInput(resource=ref, version=version),
                "create capture Job",
            )
            await self._publish(Phase.CREATING, Reason.IN_PROGRESS)
            query = PodQuery(
                namespace=request.namespace, container=target.container, job_name=self._job
            )
        else:
            query = PodQuery(
                namespace=request.namespace,
                container=target.container,
                pod_name=target.pod_name,
                pod_uid=target.pod_uid,
            )

        self._clock.begin("await-scheduled")
        pod = await self._await_pod(query, lambda seen: bool(seen.node_name), "scheduled", deadline)
        self._state.node = pod.node_name
        visibility.index(namespace=request.namespace, checkpoint_id=ckpt, node=pod.node_name)

        self._clock.begin("await-ready", Phase.CAPTURING)
        await self._publish(Phase.CAPTURING, Reason.IN_PROGRESS)
        pod = await self._await_pod(query, lambda seen: seen.container_ready, "ready", deadline)
        container = ContainerTarget(
            namespace=request.namespace,
            pod_name=pod.pod_name,
            pod_uid=pod.pod_uid,
            container=target.container,
        )
        where = f"{request.namespace}/{pod.pod_name}/{target.container}"

        if target.gms:
            self._clock.begin("await-gms-save")
            left = max(1.0, min(3600.0, (deadline - workflow.now()).total_seconds()))
            await self._node(
                ContainerSteps.await_gms_saved,
                GmsSavedInput(target=container, timeout_seconds=left),
                policies.await_ready_options(left),
                "await gms-save-complete",
            )

        return _Finish(
            dump=_Call(
                ContainerSteps.dump_container,
                ContainerDumpInput(
                    checkpoint_id=ckpt,
                    version=version,
                    target=container,
                    leave_running=source.keeps_serving,
                ),
                f"criu dump {where}",
            ),
            commit=_Call(
                ContainerSteps.commit_container,
                ContainerCommitInput(
                    checkpoint_id=ckpt,
                    version=version,
                    identity=request.identity,
                    target=container,
                    resource_name=request.name,
                    unverified=request.verify,
                ),
                f"commit version {version}",
            ),
            complete=None
            if source.keeps_serving
            else _Call(
                ContainerSteps.write_container_sentinel,
                ContainerSentinelInput(target=container, sentinel=Sentinel.SNAPSHOT_COMPLETE),
                "write snapshot-complete",
            ),
        )

    async def _dump_commit_complete(self, finish: _Finish) -> CommitResult:
        """The end of every capture, whatever its mode: dump into staging, commit (manifest
        last), then `snapshot-complete` unless the source keeps serving."""
        self._clock.begin("dump")
        self._staged = True  # from here on a failure leaves staging to discard
        dump = finish.dump
        await self._node(dump.step, dump.arg, policies.DUMP, dump.summary)

        self._clock.begin("commit", Phase.UPLOADING)
        self._held = self._require().verify  # once committed, held back until verified
        commit = finish.commit
        committed = await self._commit(
            self._start_node(commit.step, commit.arg, policies.COMMIT, commit.summary)
        )
        if finish.complete is None:
            return committed  # it keeps serving: no snapshot-complete to end it
        self._clock.begin("snapshot-complete")
        complete = finish.complete
        await self._node(complete.step, complete.arg, policies.SENTINEL, complete.summary)
        return committed

    async def _verify(self, version: str) -> None:
        """Verified checkpoints (decision 0045): a test restore of the committed version on
        the capturing node must answer before the version is offered (and uploaded: a bad
        version is never sent). A failure fails the capture, and cleanup deletes it."""
        req = self._require()
        self._clock.begin("verify")
        await self._node(
            VerifySteps.verify_version,
            VerifyInput(
                checkpoint_id=req.checkpoint_id,
                version=version,
                name=req.name,
                answer_timeout_seconds=req.verify_answer_seconds,
            ),
            policies.verify_options(req.verify_answer_seconds),
            f"test restore of version {version}",
            # A cancel waits for the test restore to stop its process and tidy, so cleanup
            # never deletes the version under it.
            cancellation=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
        )
        self._held = False

    async def _verify_in_pod(
        self, source: ClusterCapture, version: str, manifest_sha256: str
    ) -> None:
        """Verified checkpoints on a cluster (decision 0045): a verification pod, the
        Checkpoint's template shaped as a restore target of the held-back version and
        required onto the capturing node, must be restored there by its node and then be
        Ready (its kubelet's probes) within `verify_answer_seconds`. The status names the
        pod by UID meanwhile: the one pod whose node may restore the version. Then the pod
        goes and the node offers the version; a failure fails the capture (VerifyFailed,
        with what the pod said), and cleanup deletes the pod and the version."""
        req = self._require()
        self._clock.begin("verify")
        pod: VerificationPod = await self._control(
            ClusterControlSteps.create_verification_pod,
            VerificationPodInput(
                resource=source.resource,
                checkpoint_id=req.checkpoint_id,
                version=version,
                node=self._state.node,
            ),
            f"create the verification pod of version {version}",
        )
        self._verification = query = VerificationQuery(
            namespace=pod.namespace, name=pod.name, uid=pod.uid, container=source.target.container
        )
        verifying = VerifyingStatus(
            version=version, manifest_sha256=manifest_sha256, pod_name=pod.name, pod_uid=pod.uid
        )
        await self._publish(Phase.UPLOADING, Reason.IN_PROGRESS, verifying=verifying)
        await self._await_verified(query, version)
        await self._delete_verification_pod()
        await self._node(
            StorageSteps.release_version,
            ReleaseInput(checkpoint_id=req.checkpoint_id, version=version),
            policies.CLEANUP,
            f"offer version {version}",
        )
        self._held = False

    async def _await_verified(self, query: VerificationQuery, version: str) -> None:
        """Await the verification pod's outcome: the watcher's signals are the cheap path, a
        read of the pod every `read_every_seconds` covers a watcher that missed one. Done
        when its node published its restore and its container is Ready; VerifyFailed when
        it fell back (the pod's reason), ended, went, was not restored within the standby's
        deadline, or was restored and not Ready within `verify_answer_seconds`."""
        req = self._require()
        where = f"verification pod {query.namespace}/{query.name}"
        answer = req.verify_answer_seconds
        began = workflow.now()
        restored_at: datetime | None = None
        heard = 0  # signals looked at
        seen = await self._read_verification(query, where)
        while True:
            now = workflow.now()
            if seen.restore_status == policies.RESTORED and restored_at is None:
                restored_at = now
            restored_for = (now - restored_at).total_seconds() if restored_at else 0.0
            verdict = policies.verification_verdict(
                seen,
                where=where,
                version=version,
                waited=(now - began).total_seconds(),
                restored_for=restored_for,
                answer_seconds=answer,
            )
            if verdict is True:
                return
            if isinstance(verdict, PipelineFailedError):
                raise verdict
            wait = self._read_every()
            if restored_at is not None:  # wake for the answer's deadline too
                wait = max(0.1, min(wait, answer - restored_for))
            try:
                await workflow.wait_condition(self._signalled_after(heard), timeout=wait)
            except TimeoutError:
                seen = await self._read_verification(query, where)
            else:
                heard, seen = self._verification_signals, self._verification_seen

    def _signalled_after(self, heard: int) -> Callable[[], bool]:
        """Whether the watcher has signalled more than the `heard` signals looked at."""
        return lambda: self._verification_signals > heard

    async def _read_verification(
        self, query: VerificationQuery, where: str
    ) -> VerificationObservation:
        seen: VerificationObservation = await self._control(
            ClusterControlSteps.read_verification_pod, query, f"read {where}"
        )
        return seen

    async def _delete_verification_pod(self) -> None:
        query = self._verification
        if query is None:
            return
        await self._control(
            ClusterControlSteps.delete_verification_pod, query, f"delete pod {query.name}"
        )
        self._verification = None

    async def _upload(self, storage: RemoteStorage, version: str) -> CommitResult:
        """Publish the committed version to remote storage; it is Ready only once there (the
        node's copy stays as its cache). Runs after `snapshot-complete`: the workload's GPUs
        are free while the bytes move."""
        self._clock.begin("upload", Phase.UPLOADING)
        ckpt = self._require().checkpoint_id
        uploaded = await self._node(
            StorageSteps.upload_version,
            UploadInput(checkpoint_id=ckpt, version=version, storage=storage),
            policies.UPLOAD,
            f"upload version {version} to {storage.uri}",
        )
        return CommitResult(storage_uri=uploaded.storage_uri, size_bytes=uploaded.size_bytes)

    async def _warm_nodes(self, storage: RemoteStorage, version: str) -> None:
        """Start warming the caches of the nodes the resource selects (a PrefetchWorkflow
        that outlives this run). The capture is Ready already: trouble here is only logged."""
        req = self._require()
        try:
            nodes = await self._control(
                ClusterControlSteps.nodes_matching,
                NodeSelectorInput(selectors=req.prefetch_node_selectors),
                "find nodes to prefetch on",
            )
            if not nodes:
                workflow.logger.warning("prefetch: no node matches %s", req.prefetch_node_selectors)
                return
            await workflow.start_child_workflow(
                PrefetchWorkflow.run,
                PrefetchRequest(
                    checkpoint_id=req.checkpoint_id,
                    version=version,
                    storage=storage,
                    nodes=nodes,
                    node_timeout_seconds=req.node_timeout_seconds,
                    control_task_queue=req.control_task_queue,
                    nodes_at_once=req.prefetch_nodes_at_once,
                ),
                id=f"prefetch/{req.namespace}/{req.name}/{version}",
                task_queue=req.control_task_queue,
                parent_close_policy=ParentClosePolicy.ABANDON,
                static_summary=f"prefetch {req.checkpoint_id} on {', '.join(nodes)}",
            )
        except (ActivityError, WorkflowAlreadyStartedError) as err:
            workflow.logger.warning("prefetch not started: %s", err)

    async def _await_pod(
        self,
        query: PodQuery,
        reached: Callable[[PodObservation], bool],
        what: str,
        deadline: datetime,
    ) -> PodObservation:
        """Wait until the pod has `reached` what is awaited: signals are the cheap path; a
        read of the pod every `read_every_seconds` covers a watcher that missed one. A
        running pod (a PodSnapshot's) is read at once: no watcher reports on it."""
        if query.pod_name and not self._seen.pod_name:
            self._observe(
                await self._control(
                    ClusterControlSteps.read_capture_pod, query, f"read pod {query.pod_name}"
                )
            )
        while True:
            if self._seen.failure:
                raise PipelineFailedError(self._seen.failure, reason=Reason.WORKLOAD_EXITED)
            if reached(self._seen):
                return self._seen
            left = (deadline - workflow.now()).total_seconds()
            if left <= 0:
                budget = self._cluster().target.deadline_seconds
                raise PipelineFailedError(
                    f"capture pod not {what} within {budget:g} s",
                    reason=Reason.WORKLOAD_NOT_READY,
                )
            try:
                await workflow.wait_condition(
                    lambda: bool(self._seen.failure) or reached(self._seen),
                    timeout=min(self._read_every(), left),
                )
            except TimeoutError:
                self._observe(
                    await self._control(
                        ClusterControlSteps.read_capture_pod, query, f"read pod ({what}?)"
                    )
                )

    def _read_every(self) -> float:
        return self._cluster().target.read_every_seconds

    def _cluster(self) -> ClusterCapture:
        source = self._require().source
        assert isinstance(source, ClusterCapture)
        return source

    async def _commit(self, commit_step: workflow.ActivityHandle[CommitResult]) -> CommitResult:
        """The commit cannot be taken back halfway: it decides. A version it committed is
        published Ready, so no committed checkpoint ever says Cancelled."""
        try:
            commit = await asyncio.shield(commit_step)
        except asyncio.CancelledError:
            commit = await commit_step
            workflow.logger.warning(
                "cancel arrived during commit: %s is committed", self._state.version
            )
        self._staged = False
        return commit

    def _require(self) -> CaptureRequest:
        assert self._request is not None
        return self._request

    async def _node(
        self,
        step: Callable[[S, I], Awaitable[R]],
        arg: I,
        opts: policies.StepOptions,
        summary: str,
        *,
        cancellation: ActivityCancellationType = ActivityCancellationType.TRY_CANCEL,
    ) -> R:
        """Run `step` on the node's own queue; a node worker that never picks it up is lost."""
        return await self._start_node(step, arg, opts, summary, cancellation=cancellation)

    def _start_node(
        self,
        step: Callable[[S, I], Awaitable[R]],
        arg: I,
        opts: policies.StepOptions,
        summary: str,
        *,
        cancellation: ActivityCancellationType = ActivityCancellationType.TRY_CANCEL,
    ) -> workflow.ActivityHandle[R]:
        req = self._require()
        return workflow.start_activity_method(
            step,
            arg,
            task_queue=node_task_queue(self._state.node),
            start_to_close_timeout=opts.start_to_close,
            heartbeat_timeout=opts.heartbeat,
            schedule_to_start_timeout=timedelta(seconds=req.node_timeout_seconds),
            retry_policy=opts.retry,
            summary=summary,
            cancellation_type=cancellation,
        )

    async def _control(self, step: Callable[[S, I], Awaitable[R]], arg: I, summary: str) -> R:
        return await workflow.execute_activity_method(
            step,
            arg,
            task_queue=self._require().control_task_queue,
            start_to_close_timeout=policies.CONTROL.start_to_close,
            retry_policy=policies.CONTROL.retry,
            summary=summary,
        )

    async def _publish(
        self,
        phase: Phase,
        reason: Reason,
        *,
        message: str = "",
        commit: CommitResult | None = None,
        verifying: VerifyingStatus | None = None,
    ) -> None:
        await publish_status(
            "capture",
            self._require(),
            self._state,
            phase,
            reason,
            message=message,
            committed=commit is not None,
            storage_uri=commit.storage_uri if commit else "",
            size_bytes=commit.size_bytes if commit else 0,
            manifest_sha256=commit.manifest_sha256 if commit else "",
            resource=self._require().resource,
            job_name=self._job,
            recapture=bool(self._require().trigger),
            verifying=verifying,
        )

    async def _fail(self, failure: PipelineFailedError) -> None:
        self._state.failed(failure, Phase.FAILED, "failed")
        await self._publish(Phase.FAILED, failure.reason, message=failure.message)

    async def _cleanup(self) -> None:
        """Always: nothing half-written stays, no workload keeps running. A cleanup step that
        fails is logged, never raised: it must not replace the reason the capture ended."""
        req = self._require()
        if self._verification is not None:
            # Before the version goes: its pod no longer restores it, nor holds the devices.
            try:
                await self._delete_verification_pod()
            except ActivityError as err:
                workflow.logger.warning("cleanup: verification pod not deleted: %s", err.cause)
        if (self._staged or self._held) and self._state.node:
            discard = DiscardInput(
                checkpoint_id=req.checkpoint_id, version=self._state.version, unverified=self._held
            )
            summary = "discard the unverified version" if self._held else "discard staging"
            await self._try_cleanup(StorageSteps.discard_staging, discard, summary)
        launch = self._launch
        keep = self._succeeded and req.source.keeps_serving  # captured, and it serves on
        # Runs recorded before this step existed stopped only launches whose result they saw.
        if not keep and (
            launch is not None or (self._launched and workflow.patched(STOP_UNCONFIRMED_LAUNCH))
        ):
            # Without the launch's result (failed or cancelled), the node's launch record says.
            pid, ticks = (launch.pid, launch.start_ticks) if launch else (0, 0)
            stop = StopInput(
                pid=pid, start_ticks=ticks, name=req.name, checkpoint_id=req.checkpoint_id
            )
            summary = f"stop pid {pid}" if pid else f"stop {req.name} if launched"
            await self._try_cleanup(LocalProcessSteps.stop_workload, stop, summary)
        if self._job and not self._succeeded:
            # A failed or cancelled capture's Job and pod go; a captured one exits by itself.
            job = JobRef(namespace=req.namespace, name=self._job)
            try:
                await self._control(
                    ClusterControlSteps.delete_capture_job, job, f"delete Job {self._job}"
                )
            except ActivityError as err:
                workflow.logger.warning("cleanup: Job %s not deleted: %s", self._job, err.cause)

    async def _try_cleanup(
        self, step: Callable[[S, I], Awaitable[None]], arg: I, summary: str
    ) -> None:
        try:
            await self._node(step, arg, policies.CLEANUP, summary)
        except ActivityError as err:
            failure = policies.step_failure(err, node=self._state.node)
            workflow.logger.warning("cleanup %s failed: [%s] %s", summary, failure.reason, failure)
