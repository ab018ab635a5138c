"""The `warmstart` CLI: dev server and workers, capture, restore, list, describe, demo.

Exit codes: 0 success, 1 the pipeline failed (or its server is unreachable), 2 usage.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from temporalio.client import Client, WorkflowFailureError

from activities.localstate import read_status
from activities.storage import CheckpointStore
from api.identity import CheckpointIdentity, checkpoint_id
from api.naming import LOCAL_NAMESPACE
from api.workload import LocalWorkload, Readiness
from workers import display
from workers.client import ServerUnavailableError, connect, workflow_ui_url
from workers.devserver import DevServerError
from workers.pipelines import (
    CheckpointLookupError,
    follow,
    resolve_checkpoint,
    start_capture,
    start_restore,
)
from workers.runtime import CriuMissingError
from workers.settings import Settings
from workers.telemetry import configure_tracing, shutdown_tracing
from workflows.contracts import CaptureRequest, RestoreRequest

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)

OutputOpt = Annotated[str, typer.Option("--output", "-o", help="table or json")]


def _settings() -> Settings:
    settings = Settings()
    configure_tracing(settings.telemetry)
    return settings


def _fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


async def _client(settings: Settings) -> Client:
    try:
        return await connect(settings)
    except ServerUnavailableError as err:
        raise _fail(str(err)) from err


@app.command()
def dev(
    port: Annotated[int | None, typer.Option(help="frontend port (default from settings)")] = None,
    ui_port: Annotated[int | None, typer.Option(help="Web UI port")] = None,
) -> None:
    """Start the Temporal dev server (persistent state, Web UI) plus control and node workers."""
    from workers.embedded import run_dev

    settings = _settings()
    try:
        asyncio.run(run_dev(settings, port=port, ui_port=ui_port, console=console))
    except KeyboardInterrupt:
        console.print("stopped")
    except (CriuMissingError, DevServerError, ServerUnavailableError) as err:
        raise _fail(str(err)) from err


@app.command()
def worker() -> None:
    """Run the control worker and this node's worker against an existing Temporal server."""
    from workers.embedded import run_workers

    settings = _settings()
    try:
        asyncio.run(run_workers(settings, console=console))
    except KeyboardInterrupt:
        console.print("stopped")
    except (CriuMissingError, ServerUnavailableError) as err:
        raise _fail(str(err)) from err


def _identity(
    name: str, identity_file: Path | None, fields: dict[str, object], extra: list[str]
) -> CheckpointIdentity:
    if identity_file is not None:
        try:
            return CheckpointIdentity.model_validate_json(identity_file.read_text())
        except (OSError, ValidationError) as err:
            raise _fail(f"--identity {identity_file}: {err}", 2) from err
    pairs = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise _fail(f"--extra {item!r}: expected KEY=VALUE", 2)
        pairs[key] = value
    try:
        given = {k: v for k, v in fields.items() if v is not None}
        return CheckpointIdentity.model_validate({"model": name, **given, "extraParameters": pairs})
    except ValidationError as err:
        raise _fail(f"identity: {display.validation_message(err)}", 2) from err


@app.command()
def capture(
    name: Annotated[str, typer.Argument(help="checkpoint name")],
    command: Annotated[list[str], typer.Argument(help="-- CMD ARGS... of the workload")],
    identity_file: Annotated[Path | None, typer.Option("--identity", help="identity JSON")] = None,
    model: Annotated[str | None, typer.Option(help="identity model (default NAME)")] = None,
    backend: Annotated[str, typer.Option(help="vllm, sglang or trtllm")] = "vllm",
    framework_version: Annotated[str | None, typer.Option(help="identity version")] = None,
    tensor_parallel_size: Annotated[int | None, typer.Option("--tp", help="identity TP")] = None,
    pipeline_parallel_size: Annotated[int | None, typer.Option("--pp", help="identity PP")] = None,
    dtype: Annotated[str | None, typer.Option(help="identity dtype")] = None,
    max_model_len: Annotated[int | None, typer.Option(help="identity max model len")] = None,
    extra: Annotated[list[str], typer.Option(help="identity extra parameter K=V")] = [],  # noqa: B006
    ready_tcp: Annotated[int | None, typer.Option(help="ready when this port accepts")] = None,
    ready_http: Annotated[str | None, typer.Option(help="ready when this URL answers 2xx")] = None,
    health_http: Annotated[str | None, typer.Option(help="URL that shows it answers")] = None,
    ready_timeout: Annotated[float, typer.Option(help="seconds to become ready")] = 600.0,
    cwd: Annotated[Path | None, typer.Option(help="working directory")] = None,
    env: Annotated[list[str], typer.Option(help="extra environment K=V")] = [],  # noqa: B006
    output: OutputOpt = "table",
) -> None:
    """Launch CMD, wait until it is warm, checkpoint it with CRIU and commit the checkpoint."""
    settings = _settings()
    identity = _identity(
        name, identity_file,
        {"model": model, "backendFramework": backend, "frameworkVersion": framework_version,
         "tensorParallelSize": tensor_parallel_size, "pipelineParallelSize": pipeline_parallel_size,
         "dtype": dtype, "maxModelLen": max_model_len},
        extra,
    )  # fmt: skip
    if ready_tcp is not None and ready_http is not None:
        raise _fail("give at most one of --ready-tcp and --ready-http", 2)
    try:
        readiness = (
            Readiness(kind="tcp", tcp_port=ready_tcp) if ready_tcp is not None
            else Readiness(kind="http", http_url=ready_http) if ready_http is not None
            else Readiness()
        )  # fmt: skip
        workload = LocalWorkload(
            name=name, command=tuple(command), cwd=str((cwd or Path.cwd()).resolve()),
            env=dict(item.partition("=")[::2] for item in env), readiness=readiness,
            health_url=health_http, ready_timeout_seconds=ready_timeout,
        )  # fmt: skip
    except ValidationError as err:
        raise _fail(display.validation_message(err), 2) from err
    request = CaptureRequest(
        name=name, identity=identity, checkpoint_id=checkpoint_id(identity),
        node=settings.node.name, workload=workload,
        control_task_queue=settings.node.control_task_queue,
    )  # fmt: skip
    result = asyncio.run(_run_capture(settings, request))
    display.capture_result(console, result, output)


async def _run_capture(settings: Settings, request: CaptureRequest) -> Any:
    client = await _client(settings)
    return await _follow(settings, client, await start_capture(client, request), "capture",
                         request.name, every=0.5)  # fmt: skip


async def _follow(
    settings: Settings, client: Client, handle: Any, kind: str, name: str, *, every: float
) -> Any:
    """Print the workflow's Web UI link, follow it with a spinner, map failure to exit 1."""
    t = settings.temporal
    link = workflow_ui_url(t.ui_url, t.namespace, handle.id, handle.result_run_id or "")
    err_console.print(f"{kind} workflow {handle.id}\n  {link}", highlight=False)
    try:
        with display.progress(err_console, f"{kind} {name}") as show:
            return await follow(client, handle, show, every=every)
    except WorkflowFailureError as err:
        raise _fail(f"{kind} {name} failed: {display.failure_message(err)}") from err
    finally:
        shutdown_tracing()


@app.command()
def restore(
    ref: Annotated[str, typer.Argument(help="checkpoint name or 16-hex checkpoint ID")],
    version: Annotated[str, typer.Option(help="version (default newest)")] = "",
    timeout: Annotated[float, typer.Option(help="seconds for the workload to answer")] = 120.0,
    output: OutputOpt = "table",
) -> None:
    """Restore the newest committed checkpoint named REF (or with ID REF) on this node."""
    settings = _settings()
    try:
        manifest = resolve_checkpoint(CheckpointStore(settings.checkpoint_root), ref)
    except CheckpointLookupError as err:
        raise _fail(str(err)) from err
    request = RestoreRequest(
        name=manifest.source.name, checkpoint_id=manifest.checkpoint_id,
        version=version or manifest.version, node=settings.node.name,
        answer_timeout_seconds=timeout, control_task_queue=settings.node.control_task_queue,
    )  # fmt: skip
    result = asyncio.run(_run_restore(settings, request))
    display.restore_result(console, result, output)


async def _run_restore(settings: Settings, request: RestoreRequest) -> Any:
    client = await _client(settings)
    return await _follow(settings, client, await start_restore(client, request), "restore",
                         request.name, every=0.2)  # fmt: skip


@app.command("list")
def list_checkpoints(output: OutputOpt = "table") -> None:
    """Committed checkpoints on this node, newest first."""
    settings = Settings()
    display.manifest_table(console, CheckpointStore(settings.checkpoint_root).manifests(), output)


@app.command()
def describe(
    ref: Annotated[str, typer.Argument(help="checkpoint name or 16-hex checkpoint ID")],
    output: OutputOpt = "table",
) -> None:
    """The manifest of a checkpoint plus the last capture and restore status.

    A name whose captures all failed has no manifest; its status (with the reason) is shown.
    """
    settings = Settings()
    manifest = None
    try:
        manifest = resolve_checkpoint(CheckpointStore(settings.checkpoint_root), ref)
    except CheckpointLookupError as err:
        lookup_error = err
    name = manifest.source.name if manifest else ref
    statuses = {
        kind: read_status(settings.home, kind, LOCAL_NAMESPACE, name)
        for kind in ("capture", "restore")
    }
    if manifest is None and not any(statuses.values()):
        raise _fail(str(lookup_error))
    if output == "json":
        document = {"manifest": manifest.model_dump(mode="json") if manifest else None}
        document |= {k: v.model_dump(mode="json") if v else None for k, v in statuses.items()}
        print(json.dumps(document, indent=2))
    else:
        display.describe(console, name, manifest, statuses, settings.temporal)
    if manifest is None:
        raise typer.Exit(1)


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="port of the sample worker")] = 0,
) -> None:
    """Cold-start the sample worker, capture it, stop it, restore it, and compare."""
    from workers.demo import run_demo

    settings = _settings()
    code = asyncio.run(run_demo(settings, console=console, workload_port=port))
    raise typer.Exit(code)


def main() -> None:
    """Entry point. Ends with os._exit: a process that used the Temporal client can abort in
    interpreter teardown (sdk-python#300, "PyGILState_Release"), turning success into SIGABRT.
    """
    code = 1
    try:
        app()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
