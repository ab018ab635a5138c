"""`warmstart describe` and `warmstart pipelines`: checkpoints from the catalog
(`workers.catalogs`), pipelines from Temporal."""

from __future__ import annotations

from api.errors import CheckpointNotFoundError, UnavailableError
from api.manifest import Manifest
from api.naming import LOCAL_NAMESPACE
from workers import display
from workers.catalogs import cli_catalog
from workers.client import connect
from workers.display import workflow_ui_url
from workers.operations import PipelineRecord, latest_pipeline, recent_pipelines
from workers.settings import Settings


async def describe_checkpoint(settings: Settings, ref: str, *, output: str) -> int:
    """Show `ref` (its manifest from the catalog: the remote store's, else the control
    side's); exit status 0 when a committed checkpoint exists, else 1."""
    manifest: Manifest | None = None
    try:
        _entry, manifest = await cli_catalog(settings).describe(ref)
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
        "kind": record.kind,
        "name": record.name,
        "checkpoint_id": record.checkpoint_id,
        "status": record.status,
        "step": record.step,
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


_STATUS = {"running": "Running", "failed": "Failed", "completed": "Completed"}


async def list_pipelines(settings: Settings, *, status: str | None, limit: int, output: str) -> int:
    """Recent pipelines of this node's namespace, newest first."""
    client = await connect(settings)
    records = await recent_pipelines(
        client, namespace=LOCAL_NAMESPACE, status=_STATUS.get(status or ""), limit=limit
    )
    if output == "json":
        display.print_json([_record_json(r, _ui_url(settings, r)) for r in records])
        return 0
    headers = ("KIND", "NAME", "CHECKPOINT ID", "PHASE", "STATUS", "STEP", "STARTED", "REASON")
    rows = [
        (
            r.kind,
            r.name,
            r.checkpoint_id,
            r.phase,
            r.status,
            r.step,
            r.started_at.strftime("%Y-%m-%d %H:%M:%S") if r.started_at else "",
            r.reason,
        )
        for r in records
    ]
    display.print_table(headers, rows)
    return 0
