"""The restore critical path as one node activity: verify, prepare, CRIU restore, hand over.

One activity (not several) because every matching hop costs tens of milliseconds on a
path where each 100 ms shows up in time-to-serve. Each stage is the job of one module:
the store verifies (storage), the target is prepared and probed (local), CRIU restores
(criu), the workload is told (sentinels); stages are reported by heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import shutil
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

from temporalio import activity

from activities import metrics
from activities.contracts import RestoredWorkload, RestoreInput
from activities.criu.command import IMAGES_DIR, RESTORED_PIDFILE, Criu
from activities.criu.lazy import LazyOutcome, LazyPages, LazyPagesDaemon
from activities.criu.slots import RestoreSlots
from activities.gpu.nvml import NodeGpus, local_target
from activities.host.files import write_atomically
from activities.host.layout import NodeLayout, WorkloadPaths
from activities.host.processes import is_alive, start_ticks, terminate
from activities.host.sentinels import (
    RESTORE_SENTINELS,
    clear_sentinels,
    fall_back_to_cold_start,
    write_restore_context,
    write_sentinel_file,
)
from activities.local.process import await_answer, prepare_restore_target
from activities.pipeline import NodeGate, Stages, failure_note, open_version, queue_reporter
from activities.steps import RestoreSteps
from activities.storage.catalog import load_manifest
from activities.storage.quarantine import Quarantine
from activities.storage.sources import CheckpointSource
from activities.storage.store import WORKLOAD_LOG, CheckpointStore, host_info
from activities.storage.streaming import PageStream, PageStreams, StreamPlan
from api.contract import Contract
from api.errors import (
    AlreadyRunningError,
    RestoreFailedError,
    WarmstartError,
)
from api.manifest import HostInfo, Manifest
from api.reasons import Sentinel

logger = logging.getLogger(__name__)
# How long a page source may take to exit once its daemon has ended.
STREAM_EXIT_SECONDS = 60.0


class RestoreActivities(RestoreSteps):
    def __init__(
        self,
        *,
        criu: Criu,
        store: CheckpointStore,
        layout: NodeLayout,
        node: str = "local",
        gpus: NodeGpus | None = None,
        source: CheckpointSource | None = None,
        quarantine: Quarantine | None = None,
        lazy_pages: LazyPages | None = None,
        streams: PageStreams | None = None,
        slots: RestoreSlots | None = None,
        test_restores: bool = False,
    ) -> None:
        """`quarantine`: the store's (default: its root's, with the default policy).
        `lazy_pages`: whether restores serve memory lazily (default: they do not).
        `streams`: whether restores of versions this node lacks stream their pages from the
        bucket (default: they do not; they need lazy restores).
        `slots`: the node's bound on restores in CRIU at once (default: 8; decision 0040).
        `test_restores`: this one restores for verified captures only (decision 0045): it
        opens versions held back unverified, records no quarantine evidence (the version is
        deleted instead) and keeps no work directory of a failed restore."""
        self._criu = criu
        self.test_restores = test_restores
        self.slots = slots or RestoreSlots(8)
        self.lazy_pages = lazy_pages or LazyPages(criu=criu, enabled=False)
        self.streams = streams or PageStreams(enabled=False)
        self._store = store
        self._source = source or CheckpointSource(store=store)
        self._layout = layout
        self._gpus = gpus or NodeGpus()
        quarantine = quarantine or Quarantine(store.root)
        self._gate = NodeGate(criu_version=criu.version(), quarantine=quarantine, node=node)

    @activity.defn
    async def restore_checkpoint(self, request: RestoreInput) -> RestoredWorkload:
        """Restore and hand over; on any failure nothing stays half-restored and the
        workload's control directory gets `restore-failed` (its standby then starts cold)."""
        stages = Stages()
        paths = self._layout.workload(request.name, request.checkpoint_id)
        with _one_live_instance(request.name, paths):
            return await self._restore(request, stages)

    async def _restore(self, request: RestoreInput, stages: Stages) -> RestoredWorkload:
        # Where the workload waits: its manifest says, once it has been read and checked;
        # before that (missing or damaged checkpoint) this node's own layout says.
        control_dir = self._layout.workload(request.name, request.checkpoint_id).control_dir
        version, pid, cls, claimed_version, namespace = request.version, 0, None, "", ""
        in_criu = 0
        run: _CriuRun | None = None
        stream: PageStream | None = None
        not_streamed = ""
        held = AsyncExitStack()
        clear_sentinels(control_dir, RESTORE_SENTINELS)  # this restore's outcome only
        try:
            plan: StreamPlan | None = None
            if request.storage is not None and self.streams.enabled:
                plan, stream, not_streamed = await self._open_stream(request, stages)
            if plan is None:
                stages.start("verify")
                version_dir = await open_version(
                    held,
                    self._source,
                    stages,
                    request.checkpoint_id,
                    request.version,
                    request.storage,
                    unverified=self.test_restores,
                )
                claimed = load_manifest(version_dir)
            else:
                version_dir, claimed = plan.version_dir, plan.manifest
            namespace = claimed.source.namespace
            cls = self._gate.check(claimed, self._target(claimed))
            claimed_version = claimed.version
            if plan is None:
                manifest = await asyncio.to_thread(
                    self._store.verify, version_dir, checkpoint_id=request.checkpoint_id
                )
            else:  # its files are verified as they arrive, page images chunk by chunk
                assert stream is not None
                manifest = claimed
                await stream.begin(
                    plan,
                    pidfile=stream.work_dir / RESTORED_PIDFILE,
                    background=self.streams.background,
                    threads=self.streams.threads,
                )
                await stream.ready()
            version = manifest.version
            stages.start("prepare")
            saved_output = version_dir / WORKLOAD_LOG
            state = self._layout.workloads
            await asyncio.to_thread(
                prepare_restore_target, manifest.source, saved_output, state=state
            )
            control_dir = Path(manifest.source.control_dir)
            write_restore_context(control_dir, request.env)
            queued = queue_reporter(stages)
            # Waiting longer than its answer budget, it would answer past its deadline.
            async with self.slots.slot(
                timeout=request.answer_timeout_seconds,
                what=f"restore of {request.name}",
                waiting=queued,
            ) as grant:
                in_criu = grant.running
                run = await self._criu_restore(
                    request.name, version_dir / IMAGES_DIR, stages, stream=stream
                )
            pid = run.pid
            if stream is not None and (failed := stream.error()) is not None:
                raise failed  # the page source kills the tree too: never zeros for pages
            write_sentinel_file(control_dir, Sentinel.RESTORE_COMPLETE)
            stages.start("await-answer")
            url = manifest.source.health_url or manifest.source.readiness.http_url
            await await_answer(pid, url, timeout=request.answer_timeout_seconds)
            stages.finish()
            streamed = plan

            def adopt() -> bool:  # a complete streamed copy joins the node cache
                return streamed is not None and self._source.adopt(streamed)

            if run.daemon is None:
                shutil.rmtree(run.work_dir, ignore_errors=True)  # kept only when it failed
            else:  # the version stays in use until every page is delivered
                done = _release(
                    held.pop_all(), run.work_dir, stream, control_dir, self.streams, adopt
                )
                self.lazy_pages.hand_over(run.daemon, restored_pid=pid, done=done)
        except WarmstartError as caught:
            # A stream that failed says why its process died (a damaged or missing range).
            err = (stream.error() if stream is not None else None) or caught
            await _undo(pid, control_dir, failure_note(err))
            await self._stop_lazy(run, stream)
            self._discard_work_dir(run)
            if cls is not None and not self.test_restores:  # evidence against it here
                self._gate.remember(
                    request.checkpoint_id, claimed_version, cls, err, namespace=namespace
                )
            where = f"restore of {request.name} from checkpoint {request.checkpoint_id}"
            where += f" version {version}" if version else ""
            raise type(err)(f"{where} failed: {err}", reason=err.reason) from err
        except BaseException as err:
            await _undo(pid, control_dir, failure_note(err))
            await self._stop_lazy(run, stream)
            self._discard_work_dir(run)
            raise
        finally:
            await held.aclose()  # the cache may evict the version again (unless handed over)
        record = Instance(pid=pid, start_ticks=start_ticks(pid))
        paths = self._layout.workload(request.name, request.checkpoint_id)
        write_atomically(paths.restored_record, record.model_dump_json().encode(), durable=False)
        activity.logger.info("restored %s as pid %d: %s", request.name, pid, stages.seconds)
        return RestoredWorkload(
            pid=pid,
            version=manifest.version,
            stage_seconds=stages.seconds,
            lazy_pages_pid=run.daemon.pid if run.daemon is not None else 0,
            lazy_unavailable=run.lazy_unavailable,
            page_source_pid=stream.pid if stream is not None else 0,
            stream_unavailable=not_streamed[-2000:],
            criu_running=in_criu,
        )

    async def _open_stream(
        self, request: RestoreInput, stages: Stages
    ) -> tuple[StreamPlan | None, PageStream | None, str]:
        """A streamed restore's plan and page source (decision 0039: stage `stream`), or
        (None, None, why not: "" where this node has the version). The page source starts
        first: its start-up overlaps the fetch of the version's other files."""
        assert request.storage is not None
        version = await self._source.lacks(request.checkpoint_id, request.version, request.storage)
        if not version:
            return None, None, ""  # restored from this node's copy
        stages.start("stream")
        why = await asyncio.to_thread(self.lazy_pages.unavailable)
        if why:
            why = f"streamed restores need lazy restores: {why}"
            activity.logger.warning("restoring %s after a download: %s", request.name, why)
            return None, None, why
        work_dir = self._layout.restore_work_dir(request.name)
        stream = await self.streams.start(work_dir)
        try:
            plan = await self._source.stream_plan(
                request.checkpoint_id, version, request.storage, dest=work_dir / "version"
            )
        except BaseException:
            await stream.kill()
            shutil.rmtree(work_dir, ignore_errors=True)
            raise
        if isinstance(plan, str):
            await stream.kill()
            shutil.rmtree(work_dir, ignore_errors=True)
            if plan:
                activity.logger.warning("restoring %s after a download: %s", request.name, plan)
            return None, None, plan
        return plan, stream, ""

    async def _criu_restore(
        self, name: str, images_dir: Path, stages: Stages, *, stream: PageStream | None = None
    ) -> _CriuRun:
        """CRIU restores `images_dir`: lazily where this node asks for it and can (stages
        `lazy-pages`, then `criu-restore`), else eagerly (`criu-restore`). A lazy restore
        that cannot start or fails is said (stage `lazy-unavailable`, a log line, the
        result's `lazy_unavailable`) and done eagerly instead, from a fresh work directory.
        A streamed one (`stream`) is lazy or fails: its pages are not here."""
        if stream is not None:
            stages.start("lazy-pages")
            serving = await self.lazy_pages.start(
                images_dir=images_dir,
                work_dir=stream.work_dir,
                page_server_fd=stream.daemon_end.fileno(),
            )
            stream.daemon_end.close()  # the daemon's now: its end closes when it exits
            try:
                stages.start("criu-restore")
                pid = await self._criu.restore(
                    images_dir=images_dir, work_dir=stream.work_dir, lazy=True
                )
            except BaseException:
                await self.lazy_pages.stop(serving)
                raise
            return _CriuRun(pid=pid, work_dir=stream.work_dir, daemon=serving)
        why = ""
        if self.lazy_pages.enabled:
            stages.start("lazy-pages")
            work_dir = self._layout.restore_work_dir(name)
            why = await asyncio.to_thread(self.lazy_pages.unavailable)
            daemon: LazyPagesDaemon | None = None
            try:
                if not why:
                    daemon = await self.lazy_pages.start(images_dir=images_dir, work_dir=work_dir)
                    stages.start("criu-restore")
                    pid = await self._criu.restore(
                        images_dir=images_dir, work_dir=work_dir, lazy=True
                    )
                    return _CriuRun(pid=pid, work_dir=work_dir, daemon=daemon)
            except RestoreFailedError as err:  # CRIU killed what it had restored
                why = f"lazy restore failed: {err}"
                if daemon is not None:
                    await self.lazy_pages.stop(daemon)
            except BaseException:
                if daemon is not None:
                    await self.lazy_pages.stop(daemon)
                raise
            stages.start("lazy-unavailable")
            activity.logger.warning("restoring %s eagerly: %s", name, why)
            shutil.rmtree(work_dir, ignore_errors=True)
        stages.start("criu-restore")
        work_dir = self._layout.restore_work_dir(name)
        try:
            pid = await self._criu.restore(images_dir=images_dir, work_dir=work_dir)
        except BaseException:
            self._discard_work_dir(_CriuRun(pid=0, work_dir=work_dir))
            raise
        return _CriuRun(pid=pid, work_dir=work_dir, lazy_unavailable=why[-2000:])

    def _discard_work_dir(self, run: _CriuRun | None) -> None:
        """A test restore's work directory goes even when it failed (its log's lines are
        in the failure's message); other restores keep a failed one for its logs."""
        if run is not None and self.test_restores:
            shutil.rmtree(run.work_dir, ignore_errors=True)

    async def _stop_lazy(self, run: _CriuRun | None, stream: PageStream | None) -> None:
        """After the restored process was stopped: its daemon and page source, if any, with
        it (a streamed restore's work directory holds nothing worth keeping but logs)."""
        if run is not None and run.daemon is not None:
            await self.lazy_pages.stop(run.daemon)
        if stream is not None:
            await stream.kill()
            shutil.rmtree(stream.work_dir / "version", ignore_errors=True)

    def _target(self, manifest: Manifest) -> HostInfo:
        """This node as the restored process will see it: the checkpoint's own GPUs when
        they are all here, else as many of the node's."""
        source = tuple(gpu.uuid for gpu in manifest.host.gpus)
        return host_info(local_target(source, self._gpus.facts()))


@dataclass(frozen=True)
class _CriuRun:
    """What CRIU restored: the tree's root, its work directory (CRIU's log), the lazy-pages
    daemon serving its memory (None: eager), and why a lazy restore asked for was not."""

    pid: int
    work_dir: Path
    daemon: LazyPagesDaemon | None = None
    lazy_unavailable: str = ""


def _release(
    held: AsyncExitStack,
    work_dir: Path,
    stream: PageStream | None,
    control_dir: Path,
    streams: PageStreams,
    adopt: Callable[[], bool],
) -> Callable[[LazyOutcome], Awaitable[None]]:
    """Once a lazy restore's daemon has ended: the version may be evicted again, and the work
    directory goes (kept when not every page was delivered: its logs say why). A streamed
    restore's page source is waited for: a complete copy joins the node cache (`adopt`); a
    stream that failed has killed the restored process (never left to read zeros), which
    is said and left in its control directory."""

    async def done(outcome: LazyOutcome) -> None:
        await held.aclose()
        complete = outcome.complete
        if stream is not None:
            status = await stream.wait(STREAM_EXIT_SECONDS)
            streams.ended(stream, status)
            metrics.transferred(
                "download", int(status.get("bytes", 0)), float(status.get("seconds", 0.0))
            )
            logger.info("page source %d ended: %s", stream.pid, status)
            failed = stream.error()
            if failed is not None:
                logger.error("streamed restore killed its restored process: %s", failed)
                fall_back_to_cold_start(control_dir, failure_note(failed))
            complete = complete and bool(status.get("complete"))
            if complete and await asyncio.to_thread(adopt):
                logger.info("the streamed copy joined the node cache")
            shutil.rmtree(work_dir / "version", ignore_errors=True)  # unless adopted
        if complete:
            shutil.rmtree(work_dir, ignore_errors=True)

    return done


class Instance(Contract):
    pid: int
    start_ticks: int


@contextlib.contextmanager
def _one_live_instance(name: str, paths: WorkloadPaths) -> Iterator[None]:
    """Refuse a restore while another restore of the same workload runs, or while the
    instance it restored (or the one launched for capture) is alive: they would share
    the control directory and output file. Refusing touches neither."""
    paths.root.mkdir(parents=True, exist_ok=True)
    with paths.restore_lock.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunningError(
                f"workload {name}: another restore of it is in progress"
            ) from None
        for record, what in (
            (paths.restored_record, "restored"),
            (paths.launch_record, "launched"),
        ):
            live = _live_pid(record)
            if live:
                raise AlreadyRunningError(
                    f"workload {name} already runs as pid {live} ({what}); stop it first"
                )
        yield


def _live_pid(record: Path) -> int:
    """The pid in `record` if that very process (same start time) is still alive, else 0."""
    try:
        instance = Instance.model_validate_json(record.read_bytes())
    except (FileNotFoundError, ValueError):
        return 0
    alive = is_alive(instance.pid) and start_ticks(instance.pid) == instance.start_ticks
    return instance.pid if alive else 0


async def _undo(pid: int, control_dir: Path, reason: str) -> None:
    """Leave nothing half-restored; tell a standby entrypoint to start cold."""
    if pid and is_alive(pid):
        await terminate(pid, grace_seconds=1.0)
    fall_back_to_cold_start(control_dir, reason)
