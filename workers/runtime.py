"""Build the control worker and the local node worker from settings.

Tracing comes from the client's TracingInterceptor, which Temporal also applies to workers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

from temporalio.client import Client
from temporalio.worker import Worker

from activities.criu import DUMP_OPTIONS, Criu, CriuActivities
from activities.local import LocalProcessActivities
from activities.localstate import LocalStateActivities
from activities.restoring import RestoreActivities
from activities.sentinels import SentinelActivities
from activities.storage import CheckpointStore, StorageActivities
from activities.verified import VerifiedFiles
from api.naming import node_task_queue
from workers.settings import Settings
from workflows.capture import CaptureWorkflow
from workflows.restore import RestoreWorkflow


class CriuMissingError(Exception):
    pass


def control_worker(client: Client, settings: Settings) -> Worker:
    """CaptureWorkflow and the API-side activities (local mode: the state directory)."""
    state = LocalStateActivities(state_dir=settings.home)
    return Worker(
        client,
        task_queue=settings.node.control_task_queue,
        workflows=[CaptureWorkflow],
        activities=[state.claim_checkpoint_id, state.publish_status],
    )


def node_worker(
    client: Client, settings: Settings, *, base_env: Mapping[str, str] | None = None
) -> Worker:
    """RestoreWorkflow and node-side activities on `warmstart-node-<node>`."""
    criu_path = settings.criu.resolve()
    if criu_path is None:
        raise CriuMissingError("criu is not installed: run `make criu` (needs root)")
    criu = Criu(criu_path)
    store = CheckpointStore(
        settings.checkpoint_root, verified=VerifiedFiles(settings.home / "cache" / "verified")
    )
    local = LocalProcessActivities(
        state_dir=settings.home, base_env=os.environ if base_env is None else base_env
    )
    storage = StorageActivities(store=store, criu_version=criu.version(), criu_options=DUMP_OPTIONS)
    dumping = CriuActivities(criu=criu, store=store)
    restoring = RestoreActivities(criu=criu, store=store, state_dir=settings.home)
    sentinels = SentinelActivities()
    return Worker(
        client,
        task_queue=node_task_queue(settings.node.name),
        workflows=[RestoreWorkflow],
        activities=[
            local.launch_workload,
            local.await_workload_ready,
            local.stop_workload,
            dumping.dump_checkpoint,
            storage.commit_checkpoint,
            storage.discard_staging,
            sentinels.write_sentinel,
            restoring.restore_checkpoint,
        ],
        activity_executor=ThreadPoolExecutor(max_workers=settings.node.max_concurrent_activities),
        max_concurrent_activities=settings.node.max_concurrent_activities,
        max_concurrent_activity_task_polls=settings.node.activity_pollers,
    )
