"""The `warmstart` CLI: dev server and workers, capture, restore, list, describe, demo.

Exit codes: 0 success, 1 the pipeline failed (or its server is unreachable), 2 usage.
Start time matters (a restore is a fraction of a second): this module imports only typer
at the top; each command imports what it needs (docs/decisions/0007-cli-start-time.md).
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

if TYPE_CHECKING:
    from rich.console import Console
    from temporalio.client import Client, WorkflowHandle

    from api.identity import CheckpointIdentity
    from api.workload import LocalWorkload
    from workers.settings import Settings
    from workflows.contracts import CaptureRequest, CaptureResult, RestoreRequest, RestoreResult

W = TypeVar("W")
T = TypeVar("T")

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False
)

OutputOpt = Annotated[str, typer.Option("--output", "-o", help="table or json")]


def _settings() -> Settings:
    from workers.settings import Settings

    return Settings.from_env(os.environ)


def _console(*, stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _traced(settings: Settings) -> None:
    if settings.telemetry.exporter != "off":
        from workers.telemetry import configure_tracing

        configure_tracing(settings.telemetry)


@app.command()
def dev(
    port: Annotated[int | None, typer.Option(help="frontend port (default from settings)")] = None,
    ui_port: Annotated[int | None, typer.Option(help="Web UI port")] = None,
) -> None:
    """Start the Temporal dev server (persistent state, Web UI) plus control and node workers."""
    from workers.embedded import run_dev

    settings = _settings()
    temporal = settings.temporal.on_ports(port=port, ui_port=ui_port)
    settings = settings.model_copy(update={"temporal": temporal})
    _traced(settings)
    console = _console()
    try:
        asyncio.run(run_dev(settings, console=console))
    except KeyboardInterrupt:
        console.print("stopped")


@app.command()
def worker() -> None:
    """Run the control worker and this node's worker against an existing Temporal server."""
    from workers.embedded import run_workers

    settings = _settings()
    _traced(settings)
    console = _console()
    try:
        asyncio.run(run_workers(settings, console=console))
    except KeyboardInterrupt:
        console.print("stopped")


def _identity(
    name: str, identity_file: Path | None, fields: dict[str, object], extra: list[str]
) -> CheckpointIdentity:
    from api.errors import InvalidSpecError
    from api.identity import CheckpointIdentity

    if identity_file is not None:
        try:
            return CheckpointIdentity.model_validate_json(identity_file.read_text())
        except OSError as err:
            raise InvalidSpecError(f"--identity {identity_file}: {err}") from err
    pairs = {}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidSpecError(f"--extra {item!r}: expected KEY=VALUE")
        pairs[key] = value
    given = {k: v for k, v in fields.items() if v is not None}
    return CheckpointIdentity.model_validate({"model": name, **given, "extraParameters": pairs})


def _workload(
    name: str,
    command: list[str],
    *,
    ready_tcp: int | None,
    ready_http: str | None,
    health_http: str | None,
    ready_timeout: float,
    cwd: Path | None,
    env: list[str],
) -> LocalWorkload:
    from api.errors import InvalidSpecError
    from api.workload import LocalWorkload, Readiness

    if ready_tcp is not None and ready_http is not None:
        raise InvalidSpecError("give at most one of --ready-tcp and --ready-http")
    readiness = Readiness()
    if ready_tcp is not None:
        readiness = Readiness(kind="tcp", tcp_port=ready_tcp)
    elif ready_http is not None:
        readiness = Readiness(kind="http", http_url=ready_http)
    return LocalWorkload(
        name=name,
        command=tuple(command),
        cwd=str((cwd or Path.cwd()).resolve()),
        env=dict(item.partition("=")[::2] for item in env),
        readiness=readiness,
        health_url=health_http,
        ready_timeout_seconds=ready_timeout,
    )


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
    from workers import display
    from workflows.contracts import CaptureRequest

    settings = _settings()
    fields: dict[str, object] = {
        "model": model,
        "backendFramework": backend,
        "frameworkVersion": framework_version,
        "tensorParallelSize": tensor_parallel_size,
        "pipelineParallelSize": pipeline_parallel_size,
        "dtype": dtype,
        "maxModelLen": max_model_len,
    }
    identity = _identity(name, identity_file, fields, extra)
    workload = _workload(
        name,
        command,
        ready_tcp=ready_tcp,
        ready_http=ready_http,
        health_http=health_http,
        ready_timeout=ready_timeout,
        cwd=cwd,
        env=env,
    )
    request = CaptureRequest.local(
        workload,
        identity,
        node=settings.node.name,
        control_task_queue=settings.node.control_task_queue,
    )
    result = asyncio.run(_capture(settings, request))
    display.capture_result(_console(), result, output)


async def _capture(settings: Settings, request: CaptureRequest) -> CaptureResult:
    from workers.client import connect
    from workers.operations import start_capture

    _traced(settings)
    client = await connect(settings)
    handle = await start_capture(client, request)
    return await _follow(settings, client, handle, "capture", request.name, every=0.5)


async def _restore(settings: Settings, request: RestoreRequest) -> RestoreResult:
    from workers.client import connect
    from workers.operations import start_restore

    _traced(settings)
    client = await connect(settings)
    handle = await start_restore(client, request)
    return await _follow(settings, client, handle, "restore", request.name, every=0.2)


async def _follow(
    settings: Settings,
    client: Client,
    handle: WorkflowHandle[W, T],
    kind: str,
    name: str,
    *,
    every: float,
) -> T:
    """Print the workflow's Web UI link and follow it with a spinner until it ends."""
    from workers import display
    from workers.client import workflow_ui_url
    from workers.operations import follow

    t = settings.temporal
    link = workflow_ui_url(t.ui_url, t.namespace, handle.id, handle.result_run_id or "")
    console = _console(stderr=True)
    console.print(f"{kind} workflow {handle.id}\n  {link}", soft_wrap=True)
    try:
        with display.progress(console, f"{kind} {name}") as show:
            return await follow(client, handle, show, every=every)
    finally:
        if settings.telemetry.exporter != "off":
            from workers.telemetry import shutdown_tracing

            shutdown_tracing()


@app.command()
def restore(
    ref: Annotated[str, typer.Argument(help="checkpoint name or 16-hex checkpoint ID")],
    version: Annotated[str, typer.Option(help="version (default newest)")] = "",
    timeout: Annotated[float, typer.Option(help="seconds for the workload to answer")] = 120.0,
    output: OutputOpt = "table",
) -> None:
    """Restore the newest committed checkpoint named REF (or with ID REF) on this node."""
    from activities.catalog import LocalCatalog
    from workers import display
    from workflows.contracts import RestoreRequest

    settings = _settings()
    manifest = LocalCatalog(settings.checkpoint_root).find(ref)
    request = RestoreRequest(
        name=manifest.source.name,
        checkpoint_id=manifest.checkpoint_id,
        version=version or manifest.version,
        node=settings.node.name,
        answer_timeout_seconds=timeout,
        control_task_queue=settings.node.control_task_queue,
    )
    result = asyncio.run(_restore(settings, request))
    display.restore_result(_console(), result, output)


@app.command("list")
def list_checkpoints(output: OutputOpt = "table") -> None:
    """Committed checkpoints, newest first (from the catalog; needs no server)."""
    from activities.catalog import LocalCatalog
    from workers import display

    settings = _settings()
    display.manifest_table(_console(), LocalCatalog(settings.checkpoint_root).checkpoints(), output)


@app.command()
def describe(
    ref: Annotated[str, typer.Argument(help="checkpoint name or 16-hex checkpoint ID")],
    output: OutputOpt = "table",
) -> None:
    """A checkpoint's manifest plus its latest capture and restore as Temporal knows them.

    A name whose captures all failed has no manifest; its failed capture (with the reason)
    is shown, and the command exits 1.
    """
    from workers.describing import describe_checkpoint

    code = asyncio.run(describe_checkpoint(_settings(), ref, output=output, console=_console()))
    raise typer.Exit(code)


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="port of the sample worker")] = 0,
) -> None:
    """Cold-start the sample worker, capture it, stop it, restore it, and compare."""
    from workers.demo import run_demo

    settings = _settings()
    _traced(settings)
    code = asyncio.run(run_demo(settings, console=_console(), workload_port=port))
    raise typer.Exit(code)


def exit_status(err: BaseException) -> tuple[int, str]:
    """The one mapping of errors to exit codes and messages."""
    from pydantic import ValidationError

    from api.errors import InvalidSpecError, WarmstartError

    if isinstance(err, InvalidSpecError):
        return 2, str(err)
    if isinstance(err, ValidationError):
        return 2, validation_message(err)
    if isinstance(err, WarmstartError):
        return 1, f"[{err.reason}] {err.message}"
    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    return 1, "".join(traceback.format_exception(err))


def validation_message(err: object) -> str:
    """One line per problem: `field: message`."""
    from pydantic import ValidationError

    assert isinstance(err, ValidationError)
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in err.errors()
    )


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
    except BaseException as err:
        from rich.markup import escape

        code, message = exit_status(err)
        _console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
