"""Checkpoint identity and its ID: the same hash NVIDIA Dynamo Snapshot computes.

The ID is the first 16 hex digits of SHA-256 over compact JSON encoded the way Go's
encoding/json does, so a checkpoint made by either system has the same name.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BackendFramework = Literal["vllm", "sglang", "trtllm"]

_GO_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


class CheckpointIdentity(BaseModel):
    """What makes two checkpoints interchangeable (immutable once set)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    model: str = Field(min_length=1, description="Model served, e.g. meta-llama/Llama-2-7b-hf.")
    backend_framework: BackendFramework = Field(
        alias="backendFramework", description="Inference engine: vllm, sglang or trtllm."
    )
    framework_version: str = Field(
        default="", alias="frameworkVersion", description="Engine (or Dynamo) version."
    )
    tensor_parallel_size: int = Field(default=1, ge=0, alias="tensorParallelSize")
    pipeline_parallel_size: int = Field(default=1, ge=0, alias="pipelineParallelSize")
    dtype: str = Field(default="", description="Weight dtype, e.g. bfloat16.")
    max_model_len: int = Field(
        default=0, ge=0, alias="maxModelLen", description="Context length; 0 is the default."
    )
    extra_parameters: dict[str, str] = Field(
        default_factory=dict,
        alias="extraParameters",
        description="Anything else that makes checkpoints differ (hashed, keys sorted).",
    )


def go_json(value: object) -> str:
    """Compact JSON as Go's encoding/json writes it (HTML-safe escapes, raw UTF-8)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escape in _GO_ESCAPES.items():
        text = text.replace(char, escape)
    return text


def _short_hash(payload: dict[str, object]) -> str:
    return hashlib.sha256(go_json(payload).encode("utf-8")).hexdigest()[:16]


def identity_payload(identity: CheckpointIdentity) -> dict[str, object]:
    """The hashed object: fixed key order, zero values normalised or omitted like Dynamo."""
    payload: dict[str, object] = {
        "model": identity.model,
        "backendFramework": identity.backend_framework,
    }
    if identity.framework_version:
        payload["frameworkVersion"] = identity.framework_version
    payload["tensorParallelSize"] = identity.tensor_parallel_size or 1
    payload["pipelineParallelSize"] = identity.pipeline_parallel_size or 1
    if identity.dtype:
        payload["dtype"] = identity.dtype
    if identity.max_model_len:
        payload["maxModelLen"] = identity.max_model_len
    if identity.extra_parameters:
        payload["extraParameters"] = dict(sorted(identity.extra_parameters.items()))
    return payload


def checkpoint_id(identity: CheckpointIdentity) -> str:
    """The 16-hex checkpoint ID of an identity."""
    return _short_hash(identity_payload(identity))


def pod_checkpoint_id(*, pod_uid: str, container: str) -> str:
    """The ID of a PodSnapshot that carries no identity."""
    return _short_hash({"podUID": pod_uid, "container": container})
