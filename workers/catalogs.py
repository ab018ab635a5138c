"""The catalog and the quarantine as the CLI reaches them: never through this machine's
disk, so `warmstart list`, `describe` and `quarantine` work the same from a laptop as on
a node (docs/decisions/0022-cli-through-the-control-side.md).

- With remote storage configured the catalog is that store's (`RemoteCatalog`: its index,
  one listing; a manifest is read only to describe a version).
- Without it, and for the quarantine always, the control side answers: a
  `CatalogWorkflow` on the control queue, whose worker mounts the store (the checkpoints
  PVC on a cluster, the state directory locally).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

from api.errors import CheckpointNotFoundError, InvalidSpecError, UnavailableError
from api.naming import CATALOG_WORKFLOW
from api.reasons import Reason
from workers.settings import Settings

if TYPE_CHECKING:
    from temporalio.client import Client

    from activities.contracts import CatalogAction, CatalogAnswer
    from activities.storage.catalog import Catalog
    from api.catalog import CatalogEntry
    from api.manifest import Manifest
    from api.quarantine import QuarantineEntry

# How long the CLI waits for the control worker to answer before it says none runs.
ANSWER_WITHIN = timedelta(seconds=15)


class CheckpointCatalog(Protocol):
    async def checkpoints(self) -> list[CatalogEntry]:
        """Every committed version, newest first."""
        ...

    async def find(self, ref: str) -> CatalogEntry:
        """The newest committed version named `ref`, or with checkpoint ID `ref`."""
        ...

    async def describe(self, ref: str) -> tuple[CatalogEntry, Manifest]:
        """`find(ref)` and its manifest."""
        ...


def cli_catalog(settings: Settings) -> CheckpointCatalog:
    """The remote store's catalog where one is configured, else the control side's."""
    if settings.storage.configured:
        from activities.storage.remote_catalog import RemoteCatalog
        from workers.remote import remote_backend

        backend = remote_backend(settings)
        assert backend is not None
        return StoreCatalog(RemoteCatalog(backend))
    return ControlSide(settings)


class StoreCatalog:
    """A catalog this process reads itself (a remote store's), off the event loop."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def checkpoints(self) -> list[CatalogEntry]:
        return await asyncio.to_thread(self._catalog.checkpoints)

    async def find(self, ref: str) -> CatalogEntry:
        return await asyncio.to_thread(self._catalog.find, ref)

    async def describe(self, ref: str) -> tuple[CatalogEntry, Manifest]:
        entry = await self.find(ref)
        return entry, await asyncio.to_thread(self._catalog.manifest, entry)


class ControlSide:
    """The catalog and quarantine of the store the control worker mounts, through Temporal."""

    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        self._settings = settings
        self._client = client

    async def checkpoints(self) -> list[CatalogEntry]:
        return list((await self._ask("list")).entries)

    async def find(self, ref: str) -> CatalogEntry:
        return (await self._ask("find", ref)).entries[0]

    async def describe(self, ref: str) -> tuple[CatalogEntry, Manifest]:
        answer = await self._ask("describe", ref)
        assert answer.manifest is not None
        return answer.entries[0], answer.manifest

    async def quarantine(self, ref: str = "") -> list[QuarantineEntry]:
        """The quarantine entries of `ref` (a name or checkpoint ID), or of all, oldest first."""
        return list((await self._ask("quarantine", ref)).quarantine)

    async def clear_quarantine(self, ref: str) -> tuple[str, list[QuarantineEntry]]:
        """Clear every entry of `ref`; its checkpoint ID and what was removed."""
        if not ref:
            raise InvalidSpecError("quarantine clear needs REF (a checkpoint name or ID)")
        answer = await self._ask("clear-quarantine", ref)
        return answer.checkpoint_id, list(answer.quarantine)

    async def _ask(self, action: CatalogAction, ref: str = "") -> CatalogAnswer:
        from temporalio.client import WorkflowFailureError
        from temporalio.exceptions import TimeoutError

        from activities.contracts import CatalogAnswer, CatalogQuery
        from workers.client import connect
        from workers.operations import pipeline_failure

        if self._client is None:
            self._client = await connect(self._settings)
        queue = self._settings.node.control_task_queue
        try:
            answer: CatalogAnswer = await self._client.execute_workflow(
                CATALOG_WORKFLOW,
                CatalogQuery(action=action, ref=ref),
                id=f"catalog/{action}/{uuid.uuid4()}",
                task_queue=queue,
                execution_timeout=ANSWER_WITHIN,
                result_type=CatalogAnswer,
            )
            return answer
        except WorkflowFailureError as err:
            if isinstance(err.cause, TimeoutError):
                raise UnavailableError(
                    f"no control worker answered on task queue {queue} within "
                    f"{ANSWER_WITHIN.total_seconds():g} s (start `warmstart dev`, "
                    "`warmstart worker` or the controller)"
                ) from None
            failure = pipeline_failure(err)
            if failure.reason == Reason.CHECKPOINT_NOT_FOUND:
                raise CheckpointNotFoundError(failure.message) from None
            if failure.reason == Reason.INVALID_SPEC:
                raise InvalidSpecError(failure.message) from None
            raise failure from None
