"""How the CLI shows things: progress while a pipeline runs, tables and JSON for results."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.contracts import StatusInput
from api.manifest import Manifest
from workers.client import workflow_ui_url
from workers.pipelines import Snapshot
from workers.settings import TemporalSettings


def validation_message(err: ValidationError) -> str:
    """One line per problem: `field: message`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in err.errors()
    )


def failure_message(err: WorkflowFailureError) -> str:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return f"[{cause.type}] {cause.message}" if cause.type else cause.message
    return str(cause or err)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def describe_snapshot(s: Snapshot) -> str:
    text = f"{s.progress.step} ({s.progress.phase.value})"
    if s.heartbeat:
        if "bytes" in s.heartbeat:
            text += f" · {_human_bytes(float(s.heartbeat['bytes']))}"
        if "phase" in s.heartbeat:
            text += f" · {s.heartbeat['phase']}"
        if "waited_seconds" in s.heartbeat:
            text += f" · waited {s.heartbeat['waited_seconds']} s"
    return text


@contextmanager
def progress(console: Console, title: str) -> Iterator[Callable[[Snapshot], None]]:
    """A spinner whose text follows the pipeline's current step."""
    with console.status(f"{title}: starting") as status:

        def show(s: Snapshot) -> None:
            status.update(f"{title}: {describe_snapshot(s)}")

        yield show


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


def _steps(seconds: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}s" for k, v in seconds.items())


def capture_result(console: Console, result: Any, output: str) -> None:
    _emit(console, result, output, {
        "checkpoint ID": result.checkpoint_id, "version": result.version, "node": result.node,
        "size": _human_bytes(result.size_bytes), "stored at": result.storage_uri,
        "steps": _steps(result.step_seconds),
    })  # fmt: skip


def restore_result(console: Console, result: Any, output: str) -> None:
    _emit(console, result, output, {
        "checkpoint ID": result.checkpoint_id, "version": result.version, "pid": result.pid,
        "node": result.node, "node phases": _steps(result.phase_seconds),
        "steps": _steps(result.step_seconds),
    })  # fmt: skip


def manifest_table(console: Console, manifests: list[Manifest], output: str) -> None:
    if output == "json":
        print(json.dumps([m.model_dump(mode="json") for m in manifests], indent=2))
        return
    table = Table("NAME", "CHECKPOINT ID", "VERSION", "MODEL", "BACKEND", "SIZE", "NODE", "CREATED")
    for m in manifests:
        table.add_row(
            m.source.name, m.checkpoint_id, m.version, m.identity.model,
            m.identity.backend_framework, _human_bytes(m.size_bytes), m.source.node,
            m.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )  # fmt: skip
    console.print(table)


def describe(
    console: Console,
    name: str,
    manifest: Manifest | None,
    statuses: Mapping[str, StatusInput | None],
    temporal: TemporalSettings,
) -> None:
    rows: dict[str, Any] = {"name": name}
    if manifest is None:
        rows["checkpoint"] = "none committed"
    else:
        rows |= {
            "checkpoint ID": manifest.checkpoint_id, "version": manifest.version,
            "model": manifest.identity.model, "backend": manifest.identity.backend_framework,
            "created": manifest.created_at, "command": " ".join(manifest.source.command),
            "files": len(manifest.files), "size": _human_bytes(manifest.size_bytes),
            "criu": manifest.criu.version, "kernel": manifest.host.kernel,
        }  # fmt: skip
    for kind, status in statuses.items():
        if status is None:
            continue
        rows[f"last {kind}"] = f"{status.phase.value} {status.reason} {status.message}".strip()
        rows[f"{kind} steps"] = _steps(status.step_seconds)
        rows[f"{kind} workflow"] = workflow_ui_url(
            temporal.ui_url, temporal.namespace, status.workflow_id, status.run_id
        )
    _print_rows(console, rows)
