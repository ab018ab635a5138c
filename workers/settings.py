"""The one settings object, built once at the composition root (environment prefix WARMSTART_)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel
from pydantic_settings import BaseSettings, SettingsConfigDict

from api.naming import CONTROL_TASK_QUEUE, LOCAL_NODE


class TemporalSettings(BaseModel):
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


class NodeSettings(BaseModel):
    name: str = LOCAL_NODE
    control_task_queue: str = CONTROL_TASK_QUEUE
    # Pollers hold activity slots while they wait; eager dispatch needs a free one left over.
    max_concurrent_activities: int = 16
    activity_pollers: int = 2


class CriuSettings(BaseModel):
    path: str | None = None

    def resolve(self) -> str | None:
        """The configured binary, else the first `criu` on PATH (with /usr/local/sbin)."""
        if self.path:
            return self.path
        return shutil.which("criu") or shutil.which("criu", path="/usr/local/sbin:/usr/sbin:/sbin")


class TelemetrySettings(BaseModel):
    exporter: Literal["off", "console", "otlp"] = "off"
    otlp_endpoint: str | None = None
    service_name: str = "warmstart"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WARMSTART_", env_nested_delimiter="__")

    home: Path = Path.home() / ".local" / "state" / "warmstart"
    temporal: TemporalSettings = TemporalSettings()
    node: NodeSettings = NodeSettings()
    criu: CriuSettings = CriuSettings()
    telemetry: TelemetrySettings = TelemetrySettings()

    @property
    def checkpoint_root(self) -> Path:
        return self.home / "checkpoints"

    @property
    def dev_server_db(self) -> Path:
        return self.home / "temporal.db"
