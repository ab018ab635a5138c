"""What a node worker tidies when it starts, left by captures whose cleanup never ran
(their node worker was killed and stayed away past the node timeout): workloads still
running and staged dumps. Temporal tells a capture that still runs (and will clean up
itself) from one that has ended.

Staging older than the longest dump is also swept by age in `compose.node_worker`, which
works when Temporal cannot be asked.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.host.layout import LaunchRecord, NodeLayout
from activities.host.processes import start_ticks, terminate
from activities.storage.store import CheckpointStore
from api.naming import CAPTURE_WORKFLOW
from workflows.visibility import CHECKPOINT_ID

log = logging.getLogger(__name__)
_STOP_GRACE_SECONDS = 5.0


async def stop_orphaned_workloads(client: Client, layout: NodeLayout) -> list[LaunchRecord]:
    """Stop every launched workload still running whose capture workflow has ended.

    A capture stops its workload in cleanup; a workload alive after its workflow closed
    was missed. Records without a workflow, or whose workflow cannot be asked about
    (server unreachable), are left alone: stopping a live capture's workload is worse.
    """
    stopped = []
    for record in layout.launch_records():
        if not record.workflow_id or start_ticks(record.pid) != record.start_ticks:
            continue
        handle = client.get_workflow_handle(record.workflow_id, run_id=record.run_id or None)
        try:
            status = (await handle.describe()).status
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                log.warning("cannot ask about %s: %s", record.workflow_id, err)
                continue
            status = None
        if status == WorkflowExecutionStatus.RUNNING:
            continue
        log.warning(
            "stopping workload %s (pid %d): its capture %s has ended",
            record.workload.name,
            record.pid,
            record.workflow_id,
        )
        await terminate(record.pid, grace_seconds=_STOP_GRACE_SECONDS)
        stopped.append(record)
    return stopped


async def sweep_orphaned_staging(client: Client, store: CheckpointStore) -> list[Path]:
    """Remove staged dumps of checkpoints that no running capture is writing."""
    removed = []
    for checkpoint_id, staging in store.staged():
        if not re.fullmatch(r"[0-9a-f]{16}", checkpoint_id):
            continue  # not a checkpoint ID: not ours to judge
        query = (
            f"WorkflowType = '{CAPTURE_WORKFLOW}' AND ExecutionStatus = 'Running' "
            f"AND {CHECKPOINT_ID.name} = '{checkpoint_id}'"
        )
        try:
            running = [run async for run in client.list_workflows(query, limit=1)]
        except RPCError as err:
            log.warning("cannot ask about captures of %s: %s", checkpoint_id, err)
            continue
        if running:
            continue
        log.warning("removing staging %s: no capture of %s is running", staging, checkpoint_id)
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging)
    return removed


async def tidy_node(client: Client, layout: NodeLayout) -> None:
    """Everything a node worker tidies before it takes work (see the module's docstring)."""
    await stop_orphaned_workloads(client, layout)
    await sweep_orphaned_staging(client, CheckpointStore(layout.checkpoints))
