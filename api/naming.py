"""Names the system agrees on: task queues, workflow IDs, versions, safe path elements."""

from __future__ import annotations

import re
from datetime import datetime

from api.errors import InvalidNameError

CONTROL_TASK_QUEUE = "warmstart-control"
NODE_TASK_QUEUE_PREFIX = "warmstart-node-"
MANIFEST_FILE = "manifest.json"  # a checkpoint version's commit marker, written last
CAPTURE_WORKFLOW = "CaptureWorkflow"  # workflow type names, as registered and as listed
RESTORE_WORKFLOW = "RestoreWorkflow"
PREFETCH_WORKFLOW = "PrefetchWorkflow"
CATALOG_WORKFLOW = "CatalogWorkflow"
# The query both pipelines answer with their `Progress` (the client asks it by this name,
# through `workers.operations.query_progress`, without importing the workflow modules).
PROGRESS_QUERY = "progress"
LOCAL_NODE = "local"
LOCAL_NAMESPACE = "local"

_PATH_ELEMENT = re.compile(r"^[A-Za-z0-9_.-]+$")
_CHECKPOINT_ID = re.compile(r"^[0-9a-f]{16}$")


def node_task_queue(node: str) -> str:
    """The task queue served by the node worker of `node`."""
    return NODE_TASK_QUEUE_PREFIX + require_path_element(node, what="node name")


def require_path_element(value: str, *, what: str) -> str:
    """Return `value` if it is safe as one path element, else raise InvalidNameError."""
    if not _PATH_ELEMENT.match(value) or value in {".", ".."}:
        raise InvalidNameError(f"{what} {value!r} must match [A-Za-z0-9_.-]+")
    return value


def is_checkpoint_id(value: str) -> bool:
    return bool(_CHECKPOINT_ID.match(value))


def checkpoint_version(now: datetime, suffix: str) -> str:
    """A sortable version name: `<UTC yyyymmddThhmmssZ>-<6 hex>`."""
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{suffix[:6]}"


def capture_workflow_id(*, namespace: str, name: str, key: str) -> str:
    """`capture/<namespace>/<name>/<uid>`; local mode uses the checkpoint ID as key."""
    return f"capture/{namespace}/{name}/{key}"


# Runs of one resource's capture after its first (decision 0043): `<capture ID>/<run>`, where
# the run names its trigger. A Schedule's runs get the fire time appended by Temporal.
SCHEDULED_RUN = "scheduled"
ON_DEMAND_RUN = "on-demand"


def recapture_workflow_id(capture_id: str, run: str) -> str:
    """`capture/<namespace>/<name>/<uid>/<run>`: one more capture of the same resource."""
    return f"{capture_id}/{run}"


def is_run_of(workflow_id: str, capture_id: str) -> bool:
    """Whether `workflow_id` is the capture `capture_id` or one of its later runs."""
    return workflow_id == capture_id or workflow_id.startswith(capture_id + "/")


def capture_schedule_id(*, namespace: str, name: str, key: str) -> str:
    """`capture-schedule/<namespace>/<name>/<uid>`: the Temporal Schedule of a Checkpoint."""
    return f"capture-schedule/{namespace}/{name}/{key}"


def restore_workflow_id(*, namespace: str, name: str, key: str) -> str:
    """`restore/<namespace>/<pod>/<podUID>`; local mode uses a fresh UUID as key."""
    return f"restore/{namespace}/{name}/{key}"
