"""How the CLI shows things: a status line while a pipeline runs, aligned rows and tables,
JSON for scripts. Plain text on purpose: it imports nothing, so commands start fast."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO
from urllib.parse import quote

if TYPE_CHECKING:
    from pydantic import BaseModel

    from api.catalog import CatalogEntry
    from api.manifest import Manifest
    from api.quarantine import QuarantineEntry
    from workers.operations import LiveProgress, PipelineRecord
    from workflows.contracts import CaptureResult, PrefetchReport, RestoreResult


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
            if beat.bytes_total:
                text += f" of {human_bytes(beat.bytes_total)}"
            if beat.rate:
                text += f" at {human_bytes(beat.rate)}/s"
        if beat.stage:
            text += f" · {beat.stage}"
        if beat.waited_seconds is not None:
            text += f" · waited {beat.waited_seconds} s"
    return text


@contextmanager
def status_line(title: str, out: TextIO = sys.stderr) -> Iterator[Callable[[str], None]]:
    """A status line that shows the pipeline's current step (only on a terminal)."""
    live = out.isatty()

    def show(text: str) -> None:
        if live:
            out.write(f"\r\033[K{title}: {text}")
            out.flush()

    try:
        yield show
    finally:
        if live:
            out.write("\r\033[K")
            out.flush()


@contextmanager
def progress(title: str, out: TextIO = sys.stderr) -> Iterator[Callable[[LiveProgress], None]]:
    """A status line that follows the pipeline's current step (only on a terminal)."""
    with status_line(title, out) as show:
        yield lambda update: show(describe_progress(update))


def started(title: str, workflow_id: str, link: str) -> None:
    print(f"{title}: workflow {workflow_id}\n  {link}", file=sys.stderr, flush=True)


def workflow_ui_url(ui_url: str, namespace: str, workflow_id: str, run_id: str) -> str:
    workflow = quote(workflow_id, safe="")
    return f"{ui_url}/namespaces/{namespace}/workflows/{workflow}/{run_id}/history"


def print_json(document: object) -> None:
    print(json.dumps(document, indent=2, default=str))


def print_rows(rows: Mapping[str, object]) -> None:
    width = max((len(key) for key in rows), default=0)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for line in [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def steps(seconds: Mapping[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.3f}s" for k, v in (seconds or {}).items())


def _result(result: BaseModel, output: str, rows: Mapping[str, object]) -> None:
    if output == "json":
        print(result.model_dump_json(indent=2))
    else:
        print_rows(rows)


def capture_result(result: CaptureResult, output: str) -> None:
    rows = {
        "checkpoint ID": result.checkpoint_id,
        "version": result.version,
        "node": result.node,
        "size": human_bytes(result.size_bytes),
        "stored at": result.storage_uri,
        "steps": steps(result.step_seconds),
    }
    _result(result, output, rows)


def restore_rows(result: RestoreResult) -> dict[str, object]:
    return {
        "checkpoint ID": result.checkpoint_id,
        "version": result.version,
        "pid": result.pid,
        "node": result.node,
        "restore stages": steps(result.stage_seconds),
        "steps": steps(result.step_seconds),
    }


def restore_result(result: RestoreResult, output: str) -> None:
    _result(result, output, restore_rows(result))


def restored(document: str, rows: Mapping[str, object], output: str) -> None:
    """A restore's result as the node worker rendered it (`workers.local_restore`)."""
    if output == "json":
        print(document)
    else:
        print_rows(rows)


def prefetch_report(report: PrefetchReport, output: str) -> None:
    if output == "json":
        print(report.model_dump_json(indent=2))
        return
    rows = []
    for node in report.nodes:
        done = node.result
        if done is None:
            rows.append((node.node, "failed", "", "", node.error))
            continue
        state = "downloaded" if done.downloaded else "already there"
        rows.append(
            (node.node, state, done.version, human_bytes(done.size_bytes), f"{done.seconds} s")
        )
    print_table(("NODE", "CACHE", "VERSION", "SIZE", "TIME OR ERROR"), rows)


def checkpoint_table(entries: list[CatalogEntry], output: str) -> None:
    if output == "json":
        print_json([e.summary() for e in entries])
        return
    headers = ("NAME", "CHECKPOINT ID", "VERSION", "MODEL", "BACKEND", "SIZE", "NODE", "CREATED")
    rows = [
        (
            e.name,
            e.checkpoint_id,
            e.version,
            e.model,
            e.backend,
            human_bytes(e.size_bytes),
            e.node,
            e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
        for e in entries
    ]
    print_table(headers, rows)


def quarantine_entries(entries: list[QuarantineEntry], output: str) -> None:
    if output == "json":
        print_json([entry.model_dump(mode="json") for entry in entries])
        return
    for entry in entries:
        print(entry.describe())
        print(f"  {entry.message}")
    if not entries:
        print("no checkpoint is quarantined")


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
        rows[f"{kind} steps"] = steps(record.step_seconds)
    rows[f"{kind} workflow"] = url
    return rows
