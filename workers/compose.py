"""Composition root of the workers: build the activities with their dependencies and the
control and node workers from settings (local mode).

Every worker gets the `ErrorMapping` interceptor (warmstart errors → ApplicationError), and
with metrics on, `PipelineMetrics` (steps timed, pipelines counted by outcome); tracing
comes from the client's TracingInterceptor, which Temporal also applies to workers.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from temporalio.client import Client
from temporalio.worker import Interceptor, Worker

from activities.criu.command import DUMP_OPTIONS, Criu
from activities.criu.lazy import LazyPages
from activities.criu.predump import PreDumps
from activities.criu.slots import RestoreSlots
from activities.errors import ErrorMapping
from activities.gpu.nvml import NodeGpus
from activities.host.layout import NodeLayout
from activities.local.dump import CriuActivities
from activities.local.process import LocalProcessActivities, SentinelActivities, inherited_env
from activities.local.restore import RestoreActivities
from activities.local.state import LocalControlActivities
from activities.local.verify import VerifyActivities
from activities.storage.objectstore.cache import NodeCache, share_of_disk
from activities.storage.objectstore.transfer import MiB, TransferSettings
from activities.storage.quarantine import Quarantine
from activities.storage.queries import CatalogActivities
from activities.storage.remote import RemoteStores, SecretReader
from activities.storage.sources import CheckpointSource, PrefetchActivities
from activities.storage.store import CheckpointStore, StorageActivities
from activities.storage.streaming import PageStreams
from activities.storage.verified import VerifiedFiles
from api.errors import StorageError, UnavailableError
from api.manifest import CriuInfo
from api.naming import node_task_queue
from workers.remote import store_catalog
from workers.retention import retention_activities
from workers.settings import Settings
from workflows import policies
from workflows.capture import CaptureWorkflow
from workflows.catalog import CatalogWorkflow
from workflows.prefetch import PrefetchWorkflow
from workflows.restore import RestoreWorkflow
from workflows.retention import RetentionWorkflow

log = logging.getLogger(__name__)


def quarantine(settings: Settings, root: Path | None = None, *, cluster: bool) -> Quarantine:
    """The quarantine records of the store at `root` (default: the checkpoint root), judged
    by the settings' policy for a cluster or local mode: every node's gate and the control
    side judge alike."""
    policy = settings.quarantine.policy(cluster=cluster)
    return Quarantine(root or settings.checkpoint_root, policy=policy)


def catalog_activities(
    settings: Settings,
    *,
    cluster: bool,
    on_cleared: Callable[[str], Awaitable[None]] | None = None,
) -> CatalogActivities:
    """The control side's answers to the CLI: the catalog of the store it mounts (then the
    remote store) and the quarantine entries nodes record there; `on_cleared` is told of
    each checkpoint whose quarantine the CLI cleared."""
    return CatalogActivities(
        catalog=store_catalog(settings),
        quarantine=quarantine(settings, cluster=cluster),
        on_cleared=on_cleared,
    )


def node_cache(settings: Settings, layout: NodeLayout, verified: VerifiedFiles) -> NodeCache:
    """The node cache, bounded by `cache_max_bytes`, else by `cache_max_share` of the
    filesystem that holds it (reckoned now)."""
    storage = settings.storage
    bound = storage.cache_max_bytes
    if bound is None:
        bound = share_of_disk(layout.checkpoint_cache, storage.cache_max_share)
    return NodeCache(layout.checkpoint_cache, max_bytes=bound, verified=verified)


def interceptors(settings: Settings) -> list[Interceptor]:
    """The error mapping, and with metrics on the interceptor that records them (imported
    only then: the restore path stays as lean as without)."""
    if settings.telemetry.metrics == "off":
        return [ErrorMapping()]
    from workers.metrics import PipelineMetrics

    return [ErrorMapping(), PipelineMetrics()]


def control_worker(client: Client, settings: Settings) -> Worker:
    """CaptureWorkflow and the API-side activities (local mode: the state directory), plus
    RetentionWorkflow and its activities over the checkpoint root, and CatalogWorkflow."""
    control = LocalControlActivities(state_dir=settings.home)
    return Worker(
        client,
        task_queue=settings.node.control_task_queue,
        workflows=[CaptureWorkflow, RetentionWorkflow, PrefetchWorkflow, CatalogWorkflow],
        activities=[
            control.claim_checkpoint_id,
            control.publish_status,
            *retention_activities(client, settings=settings),
            catalog_activities(settings, cluster=False).answer_catalog,
        ],
        interceptors=interceptors(settings),
    )


def cluster_control_worker(client: Client, settings: Settings, api: Any) -> Worker:
    """CaptureWorkflow, PrefetchWorkflow and RetentionWorkflow with the cluster's control
    activities (`api`: a kubernetes ApiClient); retention keeps what Ready resources and
    waiting restore-target pods use."""
    from activities.kube.control import KubeControlActivities, in_use_references
    from api.jobs import JobSettings
    from api.restore_pods import RestoreSettings

    jobs = JobSettings(checkpoint_claim=settings.kube.checkpoint_claim)
    control = KubeControlActivities(
        api,
        claims_namespace=settings.kube.namespace,
        job_settings=jobs,
        # Verification pods are shaped as the webhook shapes restore targets; each is
        # required onto its capturing node by name, so no node labels are added.
        restore_settings=RestoreSettings(jobs=jobs, node_labels=()),
        ui_url=settings.temporal.ui_url,
        temporal_namespace=settings.temporal.namespace,
        instance=os.environ.get("HOSTNAME", ""),
        quarantine=quarantine(settings, cluster=True),
    )
    return Worker(
        client,
        task_queue=settings.node.control_task_queue,
        workflows=[CaptureWorkflow, PrefetchWorkflow, RetentionWorkflow, CatalogWorkflow],
        activities=[
            control.claim_checkpoint_id,
            control.publish_status,
            control.create_capture_job,
            control.read_capture_pod,
            control.delete_capture_job,
            control.nodes_matching,
            control.create_verification_pod,
            control.read_verification_pod,
            control.delete_verification_pod,
            *retention_activities(
                client, settings=settings, ready_references=in_use_references(api)
            ),
            catalog_activities(
                settings, cluster=True, on_cleared=control.publish_quarantine
            ).answer_catalog,
        ],
        interceptors=interceptors(settings),
    )


def node_worker(
    client: Client, settings: Settings, *, base_env: Mapping[str, str] | None = None
) -> Worker:
    """RestoreWorkflow and node-side activities on `warmstart-node-<node>`.

    `base_env` is the environment workloads start from (default: the harmless part of
    this process's, `activities.local.process.inherited_env`).
    """
    criu_path = settings.criu.resolve()
    if criu_path is None:
        raise UnavailableError("criu is not installed: run `make criu` (needs root)")
    criu = Criu(criu_path)
    layout = NodeLayout(settings.home)
    verified = VerifiedFiles(layout.verified_cache)
    store = CheckpointStore(layout.checkpoints, verified=verified)
    # Staging older than the longest dump was left by a worker that died mid-dump.
    stale = policies.DUMP.start_to_close.total_seconds() + 60
    for orphan in store.sweep_staging(older_than_seconds=stale):
        log.warning("removed orphaned staging %s (older than %.0f s)", orphan, stale)
    offered = [name.strip() for name in settings.node.secret_env.split(",") if name.strip()]
    local = LocalProcessActivities(
        layout=layout,
        base_env=inherited_env(os.environ) if base_env is None else base_env,
        secret_environ={name: os.environ[name] for name in offered if name in os.environ},
    )
    gpus = NodeGpus()  # read once, on first use
    remote = RemoteStores(
        transfer=transfer_settings(settings),
        own_endpoints=settings.storage.own_endpoints(),
        read_secret=secret_reader(settings) if settings.node.cluster else None,
    )
    storage = StorageActivities(
        store=store,
        layout=layout,
        node=settings.node.name,
        criu=CriuInfo(version=criu.version(), options=DUMP_OPTIONS),
        gpus=gpus,
        remote=remote,
    )
    cache = node_cache(settings, layout, verified)
    for unkeyed in cache.sweep_unkeyed():
        log.info("removed %s: cached by an older worker without its location", unkeyed)
    if settings.telemetry.metrics != "off":
        from workers.metrics import watch_cache

        watch_cache(cache)
    source = CheckpointSource(store=store, cache=cache, remote=remote)
    prefetch = PrefetchActivities(source)
    pre_dumps = PreDumps(criu=criu, rounds=settings.criu.pre_dumps)
    dumping = CriuActivities(criu=criu, store=store, layout=layout, pre_dumps=pre_dumps)
    lazy_pages = LazyPages(criu=criu, enabled=settings.criu.lazy_pages)
    slots = RestoreSlots(settings.criu.max_concurrent_restores)  # the node's, both paths
    restorer = functools.partial(
        RestoreActivities,
        criu=criu,
        store=store,
        layout=layout,
        node=settings.node.name,
        gpus=gpus,
        source=source,
        quarantine=quarantine(settings, store.root, cluster=False),
        slots=slots,
    )
    restoring = restorer(
        lazy_pages=lazy_pages, streams=PageStreams(enabled=settings.storage.stream_restores)
    )
    # A verified capture's test restores: the same restore, without lazy pages or streams.
    verifying = VerifyActivities(
        restorer=restorer(test_restores=True),
        store=store,
        layout=layout,
    )
    sentinels = SentinelActivities(layout=layout)
    if settings.node.cluster:
        # Pods' containers only: nothing here runs a command a workflow names or dumps a
        # PID a request gives; local-mode steps sent here find no worker (NodeLost).
        mode = _container_activities(
            settings,
            criu=criu,
            store=store,
            gpus=gpus,
            source=source,
            lazy_pages=lazy_pages,
            slots=slots,
        )
    else:
        mode = [
            local.launch_workload,
            local.await_workload_ready,
            local.stop_workload,
            dumping.dump_checkpoint,
            storage.commit_checkpoint,
            sentinels.write_sentinel,
            restoring.restore_checkpoint,
            verifying.verify_version,
        ]
    return Worker(
        client,
        task_queue=node_task_queue(settings.node.name),
        workflows=[RestoreWorkflow],
        activities=[
            *mode,
            storage.upload_version,
            storage.discard_staging,
            storage.release_version,
            prefetch.prefetch_version,
        ],
        interceptors=interceptors(settings),
        max_concurrent_activities=settings.node.max_concurrent_activities,
        max_concurrent_activity_task_polls=settings.node.activity_pollers,
    )


def transfer_settings(settings: Settings) -> TransferSettings:
    storage = settings.storage
    return TransferSettings(
        part_size=storage.part_size_mib * MiB,
        concurrency=storage.concurrency,
        sse=storage.sse,
        kms_key_id=storage.kms_key_id,
        compression=storage.compression,
        streamable=storage.stream_restores,
    )


def secret_reader(settings: Settings) -> SecretReader:
    """Reads a Checkpoint's credentials Secret through the API server (a cluster node), with
    the one login and error mapping: a Secret that is not there or not this worker's to read
    is a StorageError naming it (retrying cannot help); an API server away is Unavailable
    (the step retries). Called from the transfer's thread: the call is synchronous."""
    import base64

    from kubernetes import client as kube

    from activities.kube.client import ApiCall, api_client, call_sync
    from api.errors import ForbiddenError, InvalidSpecError, NotFoundError

    api: Any = None

    def read(namespace: str, name: str) -> dict[str, str]:
        nonlocal api
        api = api or api_client(settings.kube)
        on = ApiCall("read", "Secret", namespace, name)
        try:
            secret = call_sync(kube.CoreV1Api(api).read_namespaced_secret, name, namespace, on=on)
        except (NotFoundError, ForbiddenError, InvalidSpecError) as err:
            raise StorageError(f"S3 credentials cannot be read: {err}") from err
        return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

    return read


def _container_activities(
    settings: Settings,
    *,
    criu: Criu,
    store: CheckpointStore,
    gpus: NodeGpus,
    source: CheckpointSource,
    lazy_pages: LazyPages,
    slots: RestoreSlots,
) -> list[Callable[..., Any]]:
    """A cluster node's: capture from and restore into the pods' containers (through the
    runtime its settings name)."""
    from activities.gpu.cuda import CudaCheckpoint
    from activities.pipeline import NodeGate
    from activities.runtime.announce import Announcements
    from activities.runtime.pods import PodActivities
    from activities.runtime.registry import runtime_for
    from activities.runtime.standby import StandbyRestorer

    node = settings.node
    runtime = runtime_for(node.runtime, endpoint=node.runtime_endpoint, state=node.runtime_state)
    cuda = CudaCheckpoint() if gpus.facts().devices else None
    gate = NodeGate(
        criu_version=criu.version(),
        quarantine=quarantine(settings, store.root, cluster=True),
        node=settings.node.name,
    )
    restorer = StandbyRestorer(
        runtime=runtime,
        criu=criu,
        store=store,
        gate=gate,
        gpus=gpus,
        work_root=settings.home / "restores" / "pods",
        cuda=cuda,
        source=source,
        announcements=Announcements(kubelet_root=Path(settings.node.kubelet_root), runtime=runtime),
        lazy_pages=lazy_pages,
        slots=slots,
    )
    pods = PodActivities(
        runtime=runtime,
        criu=criu,
        store=store,
        node=settings.node.name,
        gpus=gpus,
        cuda=cuda,
        restorer=restorer,
        pre_dumps=PreDumps(criu=criu, rounds=settings.criu.pre_dumps),
    )
    return [
        pods.await_gms_saved,
        pods.dump_container,
        pods.commit_container,
        pods.write_container_sentinel,
        pods.stop_standby,
        pods.restore_container,
    ]
