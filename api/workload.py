"""What a local workload is and how we know it is ready: the spec of local-mode captures."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from api.limits import ReadySeconds
from api.naming import require_path_element

ReadinessKind = Literal["sentinel", "tcp", "http"]


class Readiness(BaseModel):
    """Sentinel file by default; a TCP or HTTP probe for programs that know no sentinels."""

    model_config = ConfigDict(frozen=True)

    kind: ReadinessKind = "sentinel"
    tcp_port: int | None = Field(default=None, ge=1, le=65535)
    http_url: str | None = None

    @model_validator(mode="after")
    def _probe_matches_kind(self) -> Readiness:
        if self.kind == "tcp" and self.tcp_port is None:
            raise ValueError("readiness kind 'tcp' needs tcp_port")
        if self.kind == "http":
            if self.http_url is None:
                raise ValueError("readiness kind 'http' needs http_url")
            _require_http_url(self.http_url)
        return self


def _require_http_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host")
    return url


class LocalWorkload(BaseModel):
    """A program the local node worker launches, warms up and checkpoints."""

    model_config = ConfigDict(frozen=True)

    name: str
    command: tuple[str, ...] = Field(min_length=1)
    cwd: str
    env: dict[str, str] = Field(default_factory=dict)
    readiness: Readiness = Readiness()
    health_url: str | None = None
    ready_timeout_seconds: ReadySeconds = 600.0

    @field_validator("name")
    @classmethod
    def _name_is_path_safe(cls, value: str) -> str:
        return require_path_element(value, what="workload name")

    @field_validator("cwd")
    @classmethod
    def _cwd_is_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(f"working directory {value!r} must be an absolute path")
        return value

    @field_validator("health_url")
    @classmethod
    def _health_url_is_http(cls, value: str | None) -> str | None:
        return None if value is None else _require_http_url(value)

    @property
    def answer_url(self) -> str | None:
        """The URL that shows the workload answers: its health URL, else its HTTP probe."""
        return self.health_url or self.readiness.http_url
