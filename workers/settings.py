"""The one settings object, built once at the composition root from `WARMSTART_*` variables.

`WARMSTART_HOME=/x` sets `home`; nested fields use `__`: `WARMSTART_TEMPORAL__ADDRESS`.
Read with plain pydantic (docs/decisions/0007-cli-start-time.md: pydantic-settings cost
more start-up time than the whole `warmstart list` budget).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from api.naming import CONTROL_TASK_QUEUE, LOCAL_NODE

ENV_PREFIX = "WARMSTART_"


class TemporalSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = "localhost:7233"
    namespace: str = "default"
    ui_port: int = 8233
    ui_host: str = "localhost"
    identity: str | None = None

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def ui_url(self) -> str:
        return f"http://{self.ui_host}:{self.ui_port}"

    def on_ports(self, *, port: int | None, ui_port: int | None) -> TemporalSettings:
        """These settings with the frontend and Web UI on other ports, where given."""
        host = self.address.rsplit(":", 1)[0]
        return self.model_copy(
            update={
                "address": f"{host}:{port}" if port else self.address,
                "ui_port": ui_port or self.ui_port,
            }
        )


class NodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = LOCAL_NODE
    control_task_queue: str = CONTROL_TASK_QUEUE
    # Pollers hold activity slots while they wait; eager dispatch needs a free one left over.
    max_concurrent_activities: int = 16
    activity_pollers: int = 2


class CriuSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = None

    def resolve(self) -> str | None:
        """The configured binary, else the first `criu` on PATH (with /usr/local/sbin)."""
        if self.path:
            return self.path
        return shutil.which("criu") or shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin")


class TelemetrySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    exporter: Literal["off", "console", "otlp"] = "off"
    otlp_endpoint: str | None = None
    service_name: str = "warmstart"


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path = Path.home() / ".local" / "state" / "warmstart"
    temporal: TemporalSettings = TemporalSettings()
    node: NodeSettings = NodeSettings()
    criu: CriuSettings = CriuSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """Settings from `WARMSTART_*` variables (names are case-insensitive, like the shell's
        habit of upper case); an unknown name is an error that names it."""
        values: dict[str, Any] = {}
        for key, value in environ.items():
            if not key.upper().startswith(ENV_PREFIX):
                continue
            *parents, leaf = key[len(ENV_PREFIX) :].lower().split("__")
            node = values
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return cls.model_validate(values)

    @property
    def checkpoint_root(self) -> Path:
        return self.home / "checkpoints"

    @property
    def dev_server_db(self) -> Path:
        return self.home / "temporal.db"
