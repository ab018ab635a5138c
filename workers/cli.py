"""The `warmstart` CLI: dev server and workers, capture, restore, list, describe, gc, demo.

Exit codes: 0 success, 1 the pipeline failed (or its server is unreachable), 2 usage.
Start time matters (a restore takes a fraction of a second): this module imports only the
standard library; each command imports what it needs (docs/decisions/0007-cli-start-time.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from temporalio.client import Client, WorkflowHandle

    from api.catalog import CatalogEntry
    from api.identity import CheckpointIdentity
    from api.workload import LocalWorkload
    from workers.local_restore import Restored
    from workers.settings import Settings
    from workflows.contracts import PrefetchReport

W = TypeVar("W")
T = TypeVar("T")
Command = Callable[[argparse.Namespace], int]


def _run(pipeline: Coroutine[Any, Any, T]) -> T:
    import asyncio  # ~0.1 s of start time that `list` and `--help` do without

    return asyncio.run(pipeline)


def _settings() -> Settings:
    from workers.settings import Settings

    settings = Settings.from_env(os.environ)
    if settings.telemetry.exporter != "off":
        from workers.telemetry import configure_tracing

        configure_tracing(settings.telemetry)
    return settings


def dev(args: argparse.Namespace) -> int:
    """Start the Temporal dev server (persistent state, Web UI) plus control and node workers."""
    from workers.embedded import run_dev

    settings = _settings()
    temporal = settings.temporal.on_ports(port=args.port, ui_port=args.ui_port)
    _run(run_dev(dataclasses.replace(settings, temporal=temporal)))
    return 0


def worker(args: argparse.Namespace) -> int:
    """Run the control worker and this node's worker against an existing Temporal server."""
    from workers.embedded import run_workers

    _run(run_workers(_settings(), args.role))
    return 0


def controller(args: argparse.Namespace) -> int:
    """Run the cluster controller: the control worker and the watcher (one active replica)."""
    from workers.controller import run_controller

    _run(run_controller(_settings()))
    return 0


def webhook(args: argparse.Namespace) -> int:
    """Run the admission webhook: validates Checkpoints and PodSnapshots, shapes restore pods.

    Every replica serves it (no Lease); HTTPS with WARMSTART_WEBHOOK__CERT_FILE and
    WARMSTART_WEBHOOK__KEY_FILE, or a self-signed certificate for development.
    """
    from workers.webhook import run_webhook

    _run(run_webhook(_settings()))
    return 0


def _identity(args: argparse.Namespace) -> CheckpointIdentity:
    from api.errors import InvalidSpecError
    from api.identity import CheckpointIdentity
    from workers.arguments import pairs

    if args.identity is not None:
        try:
            return CheckpointIdentity.model_validate_json(Path(args.identity).read_text())
        except OSError as err:
            raise InvalidSpecError(f"--identity {args.identity}: {err}") from err
    fields = {
        "model": args.model or args.name,
        "backendFramework": args.backend,
        "frameworkVersion": args.framework_version,
        "tensorParallelSize": args.tp,
        "pipelineParallelSize": args.pp,
        "dtype": args.dtype,
        "maxModelLen": args.max_model_len,
        "extraParameters": pairs("--extra", args.extra),
    }
    return CheckpointIdentity.model_validate({k: v for k, v in fields.items() if v is not None})


def _secret_ref(name: str, ref: str) -> dict[str, str]:
    from api.errors import InvalidSpecError

    kind, sep, value = ref.partition(":")
    if not sep or kind not in ("file", "env") or not value:
        raise InvalidSpecError(
            f"--env-secret {name}={ref}: expected NAME=file:SECRET or NAME=env:VAR"
        )
    return {kind: value}


def _workload(args: argparse.Namespace) -> LocalWorkload:
    from api.errors import InvalidSpecError
    from api.workload import LocalWorkload, Readiness
    from workers.arguments import pairs

    if args.ready_tcp is not None and args.ready_http is not None:
        raise InvalidSpecError("give at most one of --ready-tcp and --ready-http")
    readiness = Readiness()
    if args.ready_tcp is not None:
        readiness = Readiness(kind="tcp", tcp_port=args.ready_tcp)
    elif args.ready_http is not None:
        readiness = Readiness(kind="http", http_url=args.ready_http)
    return LocalWorkload(
        name=args.name,
        command=tuple(args.command),
        cwd=str(Path(args.cwd or Path.cwd()).resolve()),
        env=pairs("--env", args.env),
        secret_env={
            k: _secret_ref(k, v) for k, v in pairs("--env-secret", args.env_secret).items()
        },
        readiness=readiness,
        health_url=args.health_http,
        ready_timeout_seconds=args.ready_timeout,
    )


def capture(args: argparse.Namespace) -> int:
    """Launch CMD, wait until it is warm, checkpoint it with CRIU and commit the checkpoint."""
    from workers import display
    from workers.operations import local_capture_request, start_capture

    settings = _settings()
    request = local_capture_request(
        settings,
        _workload(args),
        _identity(args),
        leave_running=args.leave_running,
        verify=args.verify,
        verify_answer_seconds=args.verify_timeout,
    )
    title = f"capture {request.name}"
    result = _run(_pipeline(settings, lambda c: start_capture(c, request), title, every=0.5))
    display.capture_result(result, args.output)
    return 0


def restore(args: argparse.Namespace) -> int:
    """Restore the newest committed checkpoint named REF (or with ID REF) on this node."""
    import uuid

    from workers import display
    from workers.arguments import restore_request

    settings = _settings()
    key = str(uuid.uuid4())
    if settings.telemetry.exporter == "off":  # else this process's own client traces it
        done = _restore_through_worker(settings, args, key)
        if done is not None:
            display.restored(done.json, done.rows, args.output)
            return 0
    from workers.operations import start_restore

    request = restore_request(
        settings, args.ref, version=args.version, timeout=args.timeout, env=args.env
    )
    title = f"restore {request.name}"
    pipeline = _pipeline(settings, lambda c: start_restore(c, request, key=key), title, every=0.2)
    display.restore_result(_run(pipeline), args.output)
    return 0


def _restore_through_worker(
    settings: Settings, args: argparse.Namespace, key: str
) -> Restored | None:
    """The restore run by this node's worker, which holds a warm client (no SDK import
    here); None where no worker of this home and node answers for these settings."""
    from workers import display
    from workers.local_restore import Started, restore_through_worker

    with contextlib.ExitStack() as stack:
        shown: list[Callable[[str], None]] = []

        def on_started(started: Started) -> None:
            title = f"restore {started.name}"
            t = settings.temporal
            link = display.workflow_ui_url(
                t.ui_url, t.namespace, started.workflow_id, started.run_id
            )
            display.started(title, started.workflow_id, link)
            shown.append(stack.enter_context(display.status_line(title)))

        return restore_through_worker(
            settings,
            os.environ,
            {
                "ref": args.ref,
                "version": args.version,
                "timeout": args.timeout,
                "env": args.env,
                "key": key,
            },
            on_started=on_started,
            on_progress=lambda text: shown[0](text) if shown else None,
        )


def prefetch(args: argparse.Namespace) -> int:
    """Warm node caches with a checkpoint from remote storage before restores land there
    (default: this node); one line per node."""
    from api.errors import InvalidSpecError
    from workers import display
    from workers.catalogs import cli_catalog
    from workers.client import connect
    from workers.operations import prefetch as run_prefetch
    from workers.operations import remote_storage
    from workflows.contracts import PrefetchRequest

    settings = _settings()
    storage = remote_storage(settings)
    if storage is None:
        raise InvalidSpecError("prefetch needs remote storage: set WARMSTART_STORAGE__S3_BUCKET")

    async def run() -> PrefetchReport:
        entry = await cli_catalog(settings).find(args.ref)
        request = PrefetchRequest(
            checkpoint_id=entry.checkpoint_id,
            version=args.version,
            storage=storage,
            nodes=args.node or [settings.node.name],
            control_task_queue=settings.node.control_task_queue,
            nodes_at_once=args.at_once,
        )
        return await run_prefetch(await connect(settings), request)

    report = _run(run())
    display.prefetch_report(report, args.output)
    return 0 if all(node.result is not None for node in report.nodes) else 1


async def _pipeline(
    settings: Settings,
    start: Callable[[Client], Awaitable[WorkflowHandle[W, T]]],
    title: str,
    *,
    every: float,
) -> T:
    """Start a pipeline, print its Web UI link and follow it on a status line until it ends."""
    from workers import display
    from workers.client import connect
    from workers.operations import follow

    client = await connect(settings)
    handle = await start(client)
    t = settings.temporal
    link = display.workflow_ui_url(t.ui_url, t.namespace, handle.id, handle.result_run_id or "")
    display.started(title, handle.id, link)
    try:
        with display.progress(title) as show:
            return await follow(client, handle, show, every=every)
    finally:
        if settings.telemetry.exporter != "off":
            from workers.telemetry import shutdown_tracing

            shutdown_tracing()


def list_checkpoints(args: argparse.Namespace) -> int:
    """Committed checkpoints, newest first: the remote store's (from its index) where one
    is configured, else those of the store the control worker mounts."""
    from workers import display
    from workers.catalogs import cli_catalog

    settings = _settings()

    async def run() -> list[CatalogEntry]:
        return await cli_catalog(settings).checkpoints()

    display.checkpoint_table(_run(run()), args.output)
    return 0


def quarantine(args: argparse.Namespace) -> int:
    """Checkpoints that failed to restore on a node class and start cold there: list them,
    or clear one checkpoint's entries so its next restore is tried again (through the
    control worker, which mounts the store the nodes record them in)."""
    from workers import display
    from workers.catalogs import ControlSide

    side = ControlSide(_settings())
    if args.action == "clear":
        checkpoint_id, removed = _run(side.clear_quarantine(args.ref))
        print(f"checkpoint {checkpoint_id}: {len(removed)} quarantine entr(ies) cleared")
        return 0
    display.quarantine_entries(_run(side.quarantine(args.ref)), args.output)
    return 0


def gc(args: argparse.Namespace) -> int:
    """Apply the retention policy once and print what was deleted and kept (with --schedule:
    create or update the `warmstart-retention` Schedule instead)."""
    import json

    from workers import retention
    from workers.client import connect

    if args.schedule and args.dry_run:
        from api.errors import InvalidSpecError

        raise InvalidSpecError("give at most one of --schedule and --dry-run")
    settings = _settings()

    async def run() -> list[str]:
        client = await connect(settings)
        if args.schedule:
            handle = await retention.ensure_retention_schedule(client, settings=settings)
            every = settings.retention.interval_seconds
            return [f"schedule {handle.id}: retention every {every:g} s"]
        summary = await retention.run_retention(client, settings=settings, dry_run=args.dry_run)
        if args.output == "json":
            return [json.dumps(summary.model_dump(mode="json"), indent=2)]
        return retention.summary_lines(summary)

    print("\n".join(_run(run())))
    return 0


def pipelines(args: argparse.Namespace) -> int:
    """Recent captures and restores as Temporal knows them: running, failed, completed."""
    from workers.describing import list_pipelines

    return _run(
        list_pipelines(_settings(), status=args.status, limit=args.limit, output=args.output)
    )


def describe(args: argparse.Namespace) -> int:
    """A checkpoint's manifest plus its latest capture and restore as Temporal knows them
    (exit 1 when none is committed, e.g. all captures of the name failed)."""
    from workers.describing import describe_checkpoint

    return _run(describe_checkpoint(_settings(), args.ref, output=args.output))


def crds(args: argparse.Namespace) -> int:
    """Print the CustomResourceDefinitions (Checkpoint, PodSnapshot) as YAML for kubectl apply."""
    from pathlib import Path

    from api.crds import all_crds, render

    if args.write:
        for name, definition in all_crds().items():
            (Path(args.write) / name).write_text(render(definition))
            print(Path(args.write) / name)
        return 0
    print("---\n".join(render(definition) for definition in all_crds().values()), end="")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Cold-start the sample worker, capture it, stop it, restore it, and compare."""
    from rich.console import Console

    from workers.demo import run_demo

    return _run(run_demo(_settings(), console=Console(), workload_port=args.port))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="warmstart",
        description="Durable CRIU checkpoint/restore pipelines, each a Temporal workflow.",
        epilog="Exit codes: 0 success, 1 the pipeline failed or no server, 2 usage.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def command(fn: Command, name: str | None = None) -> argparse.ArgumentParser:
        doc = (fn.__doc__ or "").split("\n\n")[0].replace("\n", " ")
        sub = commands.add_parser(name or fn.__name__, help=doc, description=doc)
        sub.set_defaults(run=fn)
        return sub

    def output(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-o", "--output", choices=("table", "json"), default="table")

    sub = command(dev)
    sub.add_argument("--port", type=int, help="frontend port (default from settings)")
    sub.add_argument("--ui-port", type=int, help="Web UI port (default from settings)")
    sub = command(worker)
    sub.add_argument(
        "--role",
        choices=("all", "control", "node"),
        default="all",
        help="run only the control worker or only this node's worker (default: both)",
    )

    command(controller)
    command(webhook)

    sub = command(capture)
    sub.add_argument("name", metavar="NAME", help="checkpoint name")
    sub.add_argument("command", metavar="CMD", nargs="+", help="-- CMD ARGS... of the workload")
    identity = sub.add_argument_group("identity (the checkpoint ID is its hash)")
    identity.add_argument("--identity", metavar="FILE", help="identity JSON file")
    identity.add_argument("--model", help="model (default NAME)")
    identity.add_argument("--backend", default="vllm", help="vllm, sglang or trtllm")
    identity.add_argument("--framework-version")
    identity.add_argument("--tp", type=int, help="tensor parallel size")
    identity.add_argument("--pp", type=int, help="pipeline parallel size")
    identity.add_argument("--dtype")
    identity.add_argument("--max-model-len", type=int)
    identity.add_argument("--extra", action="append", default=[], metavar="K=V")
    ready = sub.add_argument_group("readiness (default: the ready-for-snapshot sentinel)")
    ready.add_argument("--ready-tcp", type=int, metavar="PORT", help="ready when PORT accepts")
    ready.add_argument("--ready-http", metavar="URL", help="ready when URL answers 2xx")
    ready.add_argument("--health-http", metavar="URL", help="URL that shows it answers")
    ready.add_argument("--ready-timeout", type=float, default=600.0, metavar="SECONDS")
    sub.add_argument(
        "--leave-running",
        action="store_true",
        help="keep the workload serving after the capture (it is not stopped and gets no "
        "snapshot-complete)",
    )
    sub.add_argument(
        "--verify",
        action="store_true",
        help="before the checkpoint is offered, restore it once on this node into a throwaway "
        "process that must answer (then stopped); one that does not fails the capture "
        "(VerifyFailed) and is deleted",
    )
    sub.add_argument(
        "--verify-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long the test restore may take to answer (default: 120)",
    )
    sub.add_argument("--cwd", help="working directory (default: the current one)")
    sub.add_argument("--env", action="append", default=[], metavar="K=V", help="environment")
    sub.add_argument(
        "--env-secret",
        action="append",
        default=[],
        metavar="K=file:NAME|env:VAR",
        help="a variable whose value the node resolves: the file NAME in its secrets directory"
        " or its own variable VAR (the value never enters the workflow history)",
    )
    output(sub)

    sub = command(restore)
    sub.add_argument("ref", metavar="REF", help="checkpoint name or 16-hex checkpoint ID")
    sub.add_argument("--version", default="", help="version (default: the newest)")
    sub.add_argument("--timeout", type=float, default=120.0, help="seconds to answer")
    sub.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="the restored process's new value of a variable a Dynamo worker re-reads after a "
        "restore (POD_NAME, DYN_NAMESPACE, ...); handed over in restore-context.json, every "
        "other one of those names is cleared",
    )
    output(sub)

    sub = command(prefetch)
    sub.add_argument("ref", metavar="REF", help="checkpoint name or 16-hex checkpoint ID")
    sub.add_argument("--version", default="", help="version (default: the newest stored)")
    sub.add_argument(
        "--node", action="append", default=[], metavar="NODE", help="a node to warm (repeat)"
    )
    sub.add_argument(
        "--at-once",
        type=int,
        default=0,
        metavar="N",
        help="how many nodes fetch at once, a cap on the bucket's concurrent reads (default: "
        "all at once)",
    )
    output(sub)

    output(command(list_checkpoints, "list"))
    sub = command(crds)
    sub.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR instead")

    sub = command(quarantine)
    sub.add_argument("action", choices=("list", "clear"), nargs="?", default="list")
    sub.add_argument("ref", metavar="REF", nargs="?", default="", help="name or checkpoint ID")
    output(sub)

    sub = command(gc)
    sub.add_argument("--dry-run", action="store_true", help="report only; delete nothing")
    sub.add_argument("--schedule", action="store_true", help="create or update the Schedule")
    output(sub)

    sub = command(pipelines)
    statuses = ("running", "failed", "completed")
    sub.add_argument("--status", choices=statuses, type=str.lower, help="only these")
    sub.add_argument("--limit", type=int, default=20, help="at most this many (newest first)")
    output(sub)

    sub = command(describe)
    sub.add_argument("ref", metavar="REF", help="checkpoint name or 16-hex checkpoint ID")
    output(sub)

    sub = command(demo)
    sub.add_argument("--port", type=int, default=0, help="port of the sample worker")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point. Ends with os._exit: a process that used the Temporal client can abort in
    interpreter teardown (sdk-python#300, "PyGILState_Release"), turning success into SIGABRT.
    """
    code = 1
    try:
        args = _parser().parse_args(argv)
        code = args.run(args)
    except SystemExit as done:  # argparse: --help (0) and usage errors (2)
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    except BaseException as err:
        from workers.arguments import exit_status

        code, message = exit_status(err)
        print(f"error: {message}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
