"""warmstart's copy of Dynamo's worker contract (api.dynamo) against Dynamo's own published
code (ai-dynamo 1.6.1, installed by `make`): the same names, and the same
`restore-context.json` as Dynamo's own restore standby writes for the same environment."""

from __future__ import annotations

import json
from pathlib import Path

from api import dynamo
from tests.dynamo import run_dynamo

CONSTANTS = """
import json
from importlib.metadata import version
from dynamo.common.snapshot import constants as c
print(json.dumps({
    "version": version("ai-dynamo"),
    "names": sorted(c.KUBERNETES_REQUIRED_ENV_NAMES | c.KUBERNETES_OPTIONAL_ENV_NAMES
                    | c.RESTORE_RUNTIME_ENV_NAMES),
    "control_dir_env": c.SNAPSHOT_CONTROL_DIR_ENV,
    "context_file": c.SNAPSHOT_RESTORE_CONTEXT_FILE,
    "standby_env": c.SNAPSHOT_RESTORE_STANDBY_ENV,
    "sentinels": [c.READY_FOR_SNAPSHOT_FILE, c.SNAPSHOT_COMPLETE_FILE, c.RESTORE_COMPLETE_FILE],
}))
"""


def test_the_names_are_dynamos_own() -> None:
    theirs = run_dynamo(CONSTANTS)
    assert theirs["version"] == dynamo.DYNAMO_VERSION
    assert theirs["names"] == sorted(dynamo.RESTORE_CONTEXT_ENV_NAMES)
    assert theirs["control_dir_env"] == dynamo.CONTROL_DIR_ENV
    assert theirs["context_file"] == dynamo.RESTORE_CONTEXT_FILE
    assert theirs["standby_env"] == dynamo.RESTORE_STANDBY_ENV
    assert theirs["sentinels"] == ["ready-for-snapshot", "snapshot-complete", "restore-complete"]


def test_the_restore_context_is_byte_for_byte_what_dynamos_standby_writes(
    tmp_path: Path,
) -> None:
    environ = {
        "POD_NAME": "llama-0",
        "POD_UID": "0b7c",
        "POD_NAMESPACE": "inference",
        "DYN_NAMESPACE": "dynamo \u00e9\u2028<&>",  # JSON escapes, as Python writes them
        "DYN_SYSTEM_PORT": "",
        "HF_TOKEN": "secret",  # not a context name: never written
    }
    write = (
        "import json, sys\n"
        "from dynamo.common.snapshot.restore_context import write_snapshot_restore_context\n"
        "write_snapshot_restore_context(sys.argv[1] if len(sys.argv) > 1 else None)\n"
        "print('null')\n"
    )
    control = tmp_path / "control"
    run_dynamo(write, {**environ, dynamo.CONTROL_DIR_ENV: str(control)})
    theirs = (control / dynamo.RESTORE_CONTEXT_FILE).read_bytes()
    assert dynamo.restore_context(environ) == theirs
    assert "HF_TOKEN" not in json.loads(theirs)["env"]


def test_dynamos_worker_code_reads_the_context_warmstart_writes(tmp_path: Path) -> None:
    from activities.host.sentinels import write_restore_context

    write_restore_context(tmp_path, {"POD_NAME": "llama-1", "POD_UID": "u-1"})
    applied = run_dynamo(
        "import json, os\n"
        "from dynamo.common.snapshot.restore_context import apply_snapshot_restore_env\n"
        "applied = apply_snapshot_restore_env()\n"
        "print(json.dumps([applied, os.environ.get('POD_NAME'), 'DYN_NAMESPACE' in os.environ]))\n",
        {dynamo.CONTROL_DIR_ENV: str(tmp_path), "POD_NAME": "capture-0", "DYN_NAMESPACE": "old"},
    )
    values, pod_name, kept = applied
    assert pod_name == "llama-1" and values["POD_UID"] == "u-1"
    assert values["DYN_NAMESPACE"] is None and kept is False  # cleared: the new pod lacks it
