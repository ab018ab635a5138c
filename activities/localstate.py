"""Local mode's stand-in for the resource store: ID claims and status records in the state dir.

On a cluster the same activity names are served by the Kubernetes module, which claims
IDs by label and patches the resource's status.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from temporalio import activity

from activities.contracts import ClaimInput, StatusInput
from activities.errors import fatal
from activities.files import write_atomically
from api.naming import require_path_element
from api.reasons import Reason


class LocalStateActivities:
    """Control activities for local mode."""

    def __init__(self, *, state_dir: Path) -> None:
        self._state_dir = state_dir

    @activity.defn(name="claim_checkpoint_id")
    async def claim_checkpoint_id(self, request: ClaimInput) -> None:
        await asyncio.to_thread(self._claim, request)

    def _claim(self, request: ClaimInput) -> None:
        claims = self._state_dir / "claims"
        claims.mkdir(parents=True, exist_ok=True)
        path = claims / require_path_element(request.checkpoint_id, what="checkpoint ID")
        owner = {"namespace": request.namespace, "name": request.name}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            current = json.loads(path.read_text() or "{}")
            if current != owner:
                raise fatal(
                    Reason.IDENTITY_CONFLICT,
                    f"checkpoint ID {request.checkpoint_id} is already owned by "
                    f"{current.get('namespace')}/{current.get('name')}",
                ) from None
            return
        with os.fdopen(fd, "w") as out:
            json.dump(owner, out)

    @activity.defn(name="publish_status")
    async def publish_status(self, request: StatusInput) -> None:
        path = status_path(self._state_dir, request.kind, request.namespace, request.name)
        activity.logger.info(
            "%s %s/%s: %s %s", request.kind, request.namespace, request.name, request.phase,
            request.message,
        )  # fmt: skip
        await asyncio.to_thread(write_atomically, path, request.model_dump_json(indent=2).encode())


def status_path(state_dir: Path, kind: str, namespace: str, name: str) -> Path:
    return (
        state_dir / "status" / kind
        / require_path_element(namespace, what="namespace")
        / f"{require_path_element(name, what='name')}.json"
    )  # fmt: skip


def read_status(state_dir: Path, kind: str, namespace: str, name: str) -> StatusInput | None:
    path = status_path(state_dir, kind, namespace, name)
    if not path.is_file():
        return None
    return StatusInput.model_validate_json(path.read_bytes())
