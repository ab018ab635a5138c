"""The control side's answers about the store it mounts (`CatalogWorkflow`): committed
versions from its catalog (its checkpoint root, then the remote store where one is
configured), and the quarantine entries nodes record beside the checkpoints in that root
(quarantines and pending evidence, lapsed ones left out).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from temporalio import activity

from activities.contracts import CatalogAnswer, CatalogQuery
from activities.steps import CatalogSteps
from activities.storage.catalog import Catalog
from activities.storage.quarantine import Quarantine
from api.errors import InvalidSpecError, WarmstartError
from api.naming import is_checkpoint_id


class CatalogActivities(CatalogSteps):
    def __init__(
        self,
        *,
        catalog: Catalog,
        quarantine: Quarantine,
        on_cleared: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`on_cleared`: told the checkpoint ID whose quarantine was cleared (on a cluster,
        its resources' status is published again)."""
        self._catalog = catalog
        self._quarantine = quarantine
        self._on_cleared = on_cleared

    @activity.defn
    async def answer_catalog(self, request: CatalogQuery) -> CatalogAnswer:
        answer = await asyncio.to_thread(self._answer, request)
        if request.action == "clear-quarantine" and self._on_cleared is not None:
            try:
                await self._on_cleared(answer.checkpoint_id)
            except WarmstartError as err:  # a courtesy: the records are cleared already
                activity.logger.warning(
                    "quarantine of %s cleared, not yet shown: %s", answer.checkpoint_id, err
                )
        return answer

    def _answer(self, request: CatalogQuery) -> CatalogAnswer:
        catalog, ref = self._catalog, request.ref
        if request.action == "list":
            return CatalogAnswer(entries=tuple(catalog.checkpoints()))
        if request.action in ("find", "describe"):
            entry = catalog.find(ref)
            manifest = catalog.manifest(entry) if request.action == "describe" else None
            return CatalogAnswer(entries=(entry,), manifest=manifest)
        if request.action == "quarantine":
            checkpoint_id = self._checkpoint_id(ref) if ref else ""
            entries = self._quarantine.entries(checkpoint_id, pending=True)
            return CatalogAnswer(quarantine=tuple(entries), checkpoint_id=checkpoint_id)
        if not ref:
            raise InvalidSpecError("quarantine clear needs REF (a checkpoint name or ID)")
        checkpoint_id = self._checkpoint_id(ref)
        removed = self._quarantine.clear(checkpoint_id)
        return CatalogAnswer(quarantine=tuple(removed), checkpoint_id=checkpoint_id)

    def _checkpoint_id(self, ref: str) -> str:
        """An ID with quarantine entries is itself (its versions may be gone); anything
        else is resolved through the catalog."""
        if is_checkpoint_id(ref) and self._quarantine.entries(ref, pending=True):
            return ref
        return self._catalog.find(ref).checkpoint_id
