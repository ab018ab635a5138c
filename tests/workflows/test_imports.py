"""Workflows import declarations and contracts only (activities.steps and
activities.contracts): loading any workflow module in a fresh
interpreter loads no storage, compression, Kubernetes or HTTP library."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import pytest

import workflows

IMPLEMENTATION_LIBRARIES = ("boto3", "botocore", "zstandard", "kubernetes", "aiohttp", "kopf")
MODULES = sorted(f"workflows.{m.name}" for m in pkgutil.iter_modules(workflows.__path__))


@pytest.mark.parametrize("module", MODULES)
def test_a_workflow_module_loads_no_implementation_library(module: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(done.stdout))
    assert loaded & set(IMPLEMENTATION_LIBRARIES) == set()
    assert "workflows" in loaded  # the check sees what the module imported


def test_every_workflow_module_is_checked() -> None:
    assert {"workflows.capture", "workflows.restore", "workflows.retention"} <= set(MODULES)
