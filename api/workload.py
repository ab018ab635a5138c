"""What a local workload is and how we know it is ready: the spec of local-mode captures."""

from __future__ import annotations

import re
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


ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


class SecretRef(BaseModel):
    """Where the node finds a secret value: a file in its secrets directory, or one of its
    own environment variables. Only the reference travels; the value never leaves the node
    except into the workload's environment."""

    model_config = ConfigDict(frozen=True)

    file: str | None = None
    env: str | None = Field(default=None, pattern=ENV_NAME)

    @field_validator("file")
    @classmethod
    def _file_is_a_name(cls, value: str | None) -> str | None:
        return None if value is None else require_path_element(value, what="secret file")

    @model_validator(mode="after")
    def _exactly_one(self) -> SecretRef:
        if (self.file is None) == (self.env is None):
            raise ValueError("a secret reference names exactly one of file or env")
        return self

    def __str__(self) -> str:
        return f"file:{self.file}" if self.file is not None else f"env:{self.env}"


class LocalWorkload(BaseModel):
    """A program the local node worker launches, warms up and checkpoints."""

    model_config = ConfigDict(frozen=True)

    name: str
    command: tuple[str, ...] = Field(min_length=1)
    cwd: str
    env: dict[str, str] = Field(default_factory=dict)
    # Variables whose values the node resolves (`--env-secret NAME=file:X|env:Y`).
    secret_env: dict[str, SecretRef] = Field(default_factory=dict)
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

    @field_validator("env", "secret_env")
    @classmethod
    def _names_are_variables(cls, value: dict[str, object]) -> dict[str, object]:
        for name in value:
            if not re.match(ENV_NAME, name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return value

    @field_validator("health_url")
    @classmethod
    def _health_url_is_http(cls, value: str | None) -> str | None:
        return None if value is None else _require_http_url(value)
