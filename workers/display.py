"""How the CLI shows things: progress while a pipeline runs, tables and JSON for results.

Imports only rich and the resource model, so the commands that need no server start fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from api.manifest import Manifest

if TYPE_CHECKING:
    from workers.operations import LiveProgress, PipelineRecord
    from workflows.contracts import CaptureResult, RestoreResult


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_progress(live: LiveProgress) -> str:
    text = f"{live.progress.step} ({live.progress.phase.value})"
    beat = live.heartbeat
    if beat is not None:
        if beat.bytes is not None:
            text += f" · {human_bytes(beat.bytes)}"
        if beat.stage:
            text += f" · {beat.stage}"
        if beat.waited_seconds is not None:
            text += f" · waited {beat.waited_seconds} s"
    return text


@contextmanager
def progress(console: Console, title: str) -> Iterator[Callable[[LiveProgress], None]]:
    """A spinner whose text follows the pipeline's current step."""
    with console.status(f"{title}: starting") as status:

        def show(live: LiveProgress) -> None:
            status.update(f"{title}: {describe_progress(live)}")

        yield show


def print_json(document: object) -> None:
    print(json.dumps(document, indent=2, default=str))


def _emit(console: Console, model: BaseModel, output: str, rows: Mapping[str, Any]) -> None:
    if output == "json":
        print(model.model_dump_json(indent=2))
        return
    _print_rows(console, rows)


def _print_rows(console: Console, rows: Mapping[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", str(value))
    console.print(table)


def _steps(seconds: Mapping[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.3f}s" for k, v in (seconds or {}).items())


def capture_result(console: Console, result: CaptureResult, output: str) -> None:
    rows = {
        "checkpoint ID": result.checkpoint_id,
        "version": result.version,
        "node": result.node,
        "size": human_bytes(result.size_bytes),
        "stored at": result.storage_uri,
        "steps": _steps(result.step_seconds),
    }
    _emit(console, result, output, rows)


def restore_result(console: Console, result: RestoreResult, output: str) -> None:
    rows = {
        "checkpoint ID": result.checkpoint_id,
        "version": result.version,
        "pid": result.pid,
        "node": result.node,
        "restore stages": _steps(result.stage_seconds),
        "steps": _steps(result.step_seconds),
    }
    _emit(console, result, output, rows)


def manifest_table(console: Console, manifests: list[Manifest], output: str) -> None:
    if output == "json":
        print_json([m.model_dump(mode="json") for m in manifests])
        return
    table = Table("NAME", "CHECKPOINT ID", "VERSION", "MODEL", "BACKEND", "SIZE", "NODE", "CREATED")
    for m in manifests:
        table.add_row(
            m.source.name,
            m.checkpoint_id,
            m.version,
            m.identity.model,
            m.identity.backend_framework,
            human_bytes(m.size_bytes),
            m.source.node,
            m.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
    console.print(table)


def manifest_rows(manifest: Manifest | None) -> dict[str, object]:
    if manifest is None:
        return {"checkpoint": "none committed"}
    return {
        "checkpoint ID": manifest.checkpoint_id,
        "version": manifest.version,
        "model": manifest.identity.model,
        "backend": manifest.identity.backend_framework,
        "created": manifest.created_at,
        "command": " ".join(manifest.source.command),
        "files": len(manifest.files),
        "size": human_bytes(manifest.size_bytes),
        "criu": manifest.criu.version,
        "kernel": manifest.host.kernel,
    }


def pipeline_rows(record: PipelineRecord, url: str) -> dict[str, object]:
    kind = record.kind
    outcome = f"{record.phase or record.status} {record.reason} {record.message}".strip()
    rows: dict[str, object] = {f"last {kind}": outcome}
    if record.step_seconds:
        rows[f"{kind} steps"] = _steps(record.step_seconds)
    rows[f"{kind} workflow"] = url
    return rows


def describe(console: Console, name: str, rows: Mapping[str, object]) -> None:
    _print_rows(console, {"name": name, **rows})
