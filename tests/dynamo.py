"""Dynamo's published worker code for the tests (importable as `tests.dynamo`): the
`ai-dynamo` wheel that `make` installs, without its dependencies, into tests/.deps (pinned
with its hash in tests/requirements-dynamo.txt). Its snapshot module needs only the standard
library, so workloads run it with PYTHONPATH pointing there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DYNAMO_PATH = REPO / "tests" / ".deps" / "ai-dynamo"
WORKER = REPO / "tests" / "programs" / "dynamo_worker.py"


def dynamo_path() -> Path:
    """Where `dynamo` imports from; fails (not skips) when `make` did not install it."""
    if not (DYNAMO_PATH / "dynamo" / "common" / "snapshot" / "lifecycle.py").is_file():
        pytest.fail(f"ai-dynamo is not installed in {DYNAMO_PATH}: run `make setup`")
    return DYNAMO_PATH


def run_dynamo(code: str, env: Mapping[str, str] | None = None) -> Any:
    """Run `code` with Dynamo importable, in a clean environment (`env` added); it prints
    JSON, returned parsed."""
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(env or {})}
    dynamo_path()
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(DYNAMO_PATH)!r})\n{code}",
        ],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)
