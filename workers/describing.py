"""`warmstart describe`: a checkpoint from the catalog plus its pipelines from Temporal."""

from __future__ import annotations

from activities.catalog import LocalCatalog
from api.errors import CheckpointNotFoundError, UnavailableError
from api.manifest import Manifest
from api.naming import LOCAL_NAMESPACE
from workers import display
from workers.client import connect, workflow_ui_url
from workers.operations import PipelineRecord, latest_pipeline
from workers.settings import Settings


async def describe_checkpoint(settings: Settings, ref: str, *, output: str) -> int:
    """Show `ref`; exit status 0 when a committed checkpoint exists, else 1."""
    manifest: Manifest | None = None
    catalog = LocalCatalog(settings.checkpoint_root)
    try:
        manifest = catalog.manifest(catalog.find(ref))
    except CheckpointNotFoundError as err:
        not_found = err
    name = manifest.source.name if manifest else ref
    records: dict[str, PipelineRecord | None] = {}
    unavailable = ""
    try:
        client = await connect(settings)
        for kind in ("capture", "restore"):
            records[kind] = await latest_pipeline(
                client, kind, namespace=LOCAL_NAMESPACE, name=name
            )
    except UnavailableError as err:
        unavailable = str(err)
    if manifest is None and not any(records.values()):
        raise not_found
    urls = {
        kind: _ui_url(settings, record) for kind, record in records.items() if record is not None
    }
    if output == "json":
        display.print_json(
            {
                "manifest": manifest.model_dump(mode="json") if manifest else None,
                **{
                    kind: _record_json(record, urls.get(kind, ""))
                    for kind, record in records.items()
                },
                "pipelines_unavailable": unavailable or None,
            }
        )
    else:
        rows = display.manifest_rows(manifest)
        for kind, record in records.items():
            if record is not None:
                rows |= display.pipeline_rows(record, urls[kind])
        if unavailable:
            rows["pipelines"] = f"unknown: {unavailable}"
        display.print_rows({"name": name, **rows})
    return 0 if manifest is not None else 1


def _ui_url(settings: Settings, record: PipelineRecord) -> str:
    t = settings.temporal
    return workflow_ui_url(t.ui_url, t.namespace, record.workflow_id, record.run_id)


def _record_json(record: PipelineRecord | None, url: str) -> dict[str, object] | None:
    if record is None:
        return None
    return {
        "status": record.status,
        "phase": record.phase,
        "reason": record.reason,
        "message": record.message,
        "step_seconds": record.step_seconds,
        "workflow_id": record.workflow_id,
        "run_id": record.run_id,
        "url": url,
        "started_at": record.started_at.isoformat() if record.started_at else None,
        "closed_at": record.closed_at.isoformat() if record.closed_at else None,
    }
