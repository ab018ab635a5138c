"""Workers instrumented with Dynamo's own published code (ai-dynamo 1.6.1's
`dynamo.common.snapshot`, tests/programs/dynamo_worker.py) captured and restored unchanged:
in local mode here, on the cluster path in tests/test_dynamo_cluster.py. The restored
process keeps its memory (the token) and takes the new identity from `restore-context.json`."""

from __future__ import annotations

import json
import re
import sys

from temporalio.client import Client

from activities.host.processes import terminate
from activities.storage.store import CheckpointStore
from api.dynamo import RESTORE_CONTEXT_FILE
from api.workload import LocalWorkload
from tests.conftest import needs_criu
from tests.dynamo import WORKER, dynamo_path
from tests.pipeline import REPO, capture, capture_request, get_json, restore
from workers.ports import free_port
from workers.settings import Settings

pytestmark = needs_criu


async def test_a_dynamo_worker_restores_locally_with_the_restores_identity(
    client: Client, workers: Settings
) -> None:
    port = free_port()
    workload = LocalWorkload(
        name="dynamo-worker",
        command=(sys.executable, str(WORKER), str(port)),
        cwd=str(REPO),
        env={
            "PYTHONPATH": str(dynamo_path()),
            "POD_NAME": "capture-0",
            "POD_UID": "uid-of-capture-0",
            "DYN_NAMESPACE": "capture-namespace",
        },
        health_url=f"http://127.0.0.1:{port}/",
        ready_timeout_seconds=60,
    )
    # Dynamo's lifecycle runs only with DYN_SNAPSHOT_CONTROL_DIR set: without it the worker
    # would never write ready-for-snapshot and the capture would time out.
    result = await capture(client, capture_request(workers, workload))
    version_dir = CheckpointStore(workers.checkpoint_root).find(result.checkpoint_id)
    paused = re.search(r"paused ([0-9a-f]{16})", (version_dir / "workload-output.log").read_text())
    assert paused, "the worker never ran Dynamo's lifecycle"

    new = {"POD_NAME": "restore-7", "POD_UID": "uid-of-restore-7"}
    restored = await restore(client, workers, "dynamo-worker", result.checkpoint_id, env=new)
    try:
        answer = get_json(f"http://127.0.0.1:{port}/")
    finally:
        assert await terminate(restored.pid, grace_seconds=5)
    assert answer["token"] == paused.group(1)  # the captured memory
    assert answer["restored"] is True
    # Dynamo's apply_snapshot_restore_env() set the restore's values and cleared the rest.
    assert answer["env"] == {
        "POD_NAME": "restore-7",
        "POD_UID": "uid-of-restore-7",
        "POD_NAMESPACE": None,
        "DYN_NAMESPACE": None,
        "DYN_SYSTEM_PORT": None,
    }
    assert answer["applied"]["POD_NAME"] == "restore-7"
    control = workers.home / "workloads" / "dynamo-worker" / result.checkpoint_id / "control"
    context = json.loads((control / RESTORE_CONTEXT_FILE).read_text())
    assert context["env"]["POD_UID"] == "uid-of-restore-7"
    # restore-complete stays for a startup probe; Dynamo removed its own ready file.
    assert (control / "restore-complete").exists()
    assert not (control / "ready-for-snapshot").exists()
