"""Local mode's control activities: ID claims and status records in the state directory.

On a cluster the same activity definitions are implemented against Kubernetes: IDs are
claimed by label and the status is patched onto the Checkpoint resource.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

from temporalio import activity

from activities.contracts import ClaimInput, PipelineKind, StatusInput
from activities.host.files import write_atomically
from activities.steps import ControlSteps
from api.errors import IdentityConflictError
from api.naming import require_path_element


class LocalControlActivities(ControlSteps):
    def __init__(self, *, state_dir: Path) -> None:
        self._state_dir = state_dir

    @activity.defn
    async def claim_checkpoint_id(self, request: ClaimInput) -> None:
        await asyncio.to_thread(self._claim, request)

    def _claim(self, request: ClaimInput) -> None:
        claims = self._state_dir / "claims"
        claims.mkdir(parents=True, exist_ok=True)
        path = claims / require_path_element(request.checkpoint_id, what="checkpoint ID")
        owner = {"namespace": request.namespace, "name": request.name}
        # Written whole beside the claim, then linked into place: link fails if the claim
        # exists, and a crash leaves only a stray temporary file, never an empty claim.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=claims)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(owner, out)
            os.link(tmp, path)
        except FileExistsError:
            current = json.loads(path.read_text())
            if current != owner:
                raise IdentityConflictError(
                    f"checkpoint ID {request.checkpoint_id} is already owned by "
                    f"{current.get('namespace')}/{current.get('name')}"
                ) from None
        finally:
            os.unlink(tmp)

    @activity.defn
    async def publish_status(self, request: StatusInput) -> None:
        path = status_path(self._state_dir, request.kind, request.namespace, request.name)
        where = f"{request.kind} {request.namespace}/{request.name}"
        activity.logger.info("%s: %s %s %s", where, request.phase, request.reason, request.message)
        info = activity.info()
        record = StatusRecord(
            **request.model_dump(), workflow_id=info.workflow_id, run_id=info.workflow_run_id
        )
        await asyncio.to_thread(write_atomically, path, record.model_dump_json(indent=2).encode())


class StatusRecord(StatusInput):
    """A local status record: the published status plus the workflow run that wrote it."""

    workflow_id: str
    run_id: str


def status_path(state_dir: Path, kind: PipelineKind, namespace: str, name: str) -> Path:
    namespace = require_path_element(namespace, what="namespace")
    return (
        state_dir / "status" / kind / namespace / f"{require_path_element(name, what='name')}.json"
    )


def read_status(
    state_dir: Path, kind: PipelineKind, namespace: str, name: str
) -> StatusRecord | None:
    path = status_path(state_dir, kind, namespace, name)
    if not path.is_file():
        return None
    return StatusRecord.model_validate_json(path.read_bytes())
