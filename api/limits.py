"""Bounds on what a request may carry: every duration is finite and capped, every name that
becomes a path element or a queue name is checked, so bad input fails at the model with a
message naming the field instead of inside a workflow that would retry it forever."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from api.naming import require_path_element

DAY = 24 * 3600.0

# How long a workload may take to warm up (weights, compile, CUDA graphs): up to a day.
ReadySeconds = Annotated[float, Field(gt=0, le=DAY, allow_inf_nan=False)]
# How long a restored workload may take to answer, or a node to pick up a step: an hour.
ShortSeconds = Annotated[float, Field(gt=0, le=3600.0, allow_inf_nan=False)]


def _path_element(value: str) -> str:
    return require_path_element(value, what="name")


# A name, namespace or node name: one safe path element ([A-Za-z0-9_.-]+).
PathElement = Annotated[str, AfterValidator(_path_element)]
