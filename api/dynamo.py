"""The worker side of NVIDIA Dynamo's snapshot contract, as warmstart must match it.

Facts copied from Dynamo's published worker code, not our reading of its docs: the
`ai-dynamo` wheel, version 1.6.1, module `dynamo.common.snapshot` (`constants.py`,
`lifecycle.py`, `restore_context.py`). The tests import that module itself and compare
(tests/api/test_dynamo_contract.py), so a newer Dynamo that changes a name fails there.

- A worker enters snapshot mode only when `DYN_SNAPSHOT_CONTROL_DIR` is set; it then writes
  `ready-for-snapshot` and polls for `snapshot-complete` or `restore-complete`.
- After `restore-complete` the backend calls `apply_snapshot_restore_env()`: it reads
  `restore-context.json` from the control directory, `{"env": {NAME: value | null}}`, and
  fails without it. Each listed name is set (or, when null, removed) in the restored
  process's environment: that is how a restored worker learns the new pod's identity.
- An image may write the context itself: with `SNAPSHOT_RESTORE_STANDBY=1` the worker's
  entrypoint writes it from its own environment and execs `sleep infinity`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

DYNAMO_VERSION = "1.6.1"  # the release whose worker code these names were taken from
CONTROL_DIR_ENV = "DYN_SNAPSHOT_CONTROL_DIR"
# Dynamo's operator side (and warmstart's own workloads) name the directory so too.
OPERATOR_CONTROL_DIR_ENV = "SNAPSHOT_CONTROL_DIR"
CONTROL_DIR_ENVS = (OPERATOR_CONTROL_DIR_ENV, CONTROL_DIR_ENV)
RESTORE_CONTEXT_FILE = "restore-context.json"
RESTORE_STANDBY_ENV = "SNAPSHOT_RESTORE_STANDBY"

# constants.KUBERNETES_REQUIRED_ENV_NAMES
_KUBERNETES_REQUIRED = frozenset(
    {
        "DYN_NAMESPACE",
        "DYN_COMPONENT",
        "DYN_PARENT_DGD_K8S_NAME",
        "DYN_PARENT_DGD_K8S_NAMESPACE",
        "POD_NAME",
        "POD_NAMESPACE",
        "POD_UID",
    }
)
# constants.KUBERNETES_OPTIONAL_ENV_NAMES
_KUBERNETES_OPTIONAL = frozenset({"DYN_NAMESPACE_WORKER_SUFFIX"})
# constants.RESTORE_RUNTIME_ENV_NAMES: discovery, request and event planes, system server,
# target identity; all non-secret.
_RESTORE_RUNTIME = frozenset(
    {
        "DYN_DISCOVERY_BACKEND",
        "DYN_REQUEST_PLANE",
        "DYN_EVENT_PLANE",
        "DYN_EVENT_PLANE_HOST",
        "DYN_TCP_RPC_HOST",
        "DYN_TCP_RPC_PORT",
        "DYN_TCP_RESPONSE_STREAM_HOST",
        "DYN_TCP_RESPONSE_STREAM_PORT",
        "DYN_TCP_LISTEN_BACKLOG",
        "NATS_SERVER",
        "ETCD_ENDPOINTS",
        "DYN_SYSTEM_PORT",
        "DYN_HEALTH_CHECK_ENABLED",
        "DYN_SYSTEM_STARTING_HEALTH_STATUS",
        "DYN_SYSTEM_USE_ENDPOINT_HEALTH_STATUS",
        "DYN_SYSTEM_HOST",
        "DYN_SYSTEM_HEALTH_PATH",
        "DYN_SYSTEM_LIVE_PATH",
        "DYN_KUBE_DISCOVERY_MODE",
        "CONTAINER_NAME",
        "ENGINE_ID",
        "FAILOVER_LOCK_PATH",
        "DYN_VLLM_GMS_SHADOW_MODE",
        "DYN_GMS_USE_V1",
        "MODEL_EXPRESS_URL",
        "PROMETHEUS_ENDPOINT",
    }
)
# The names a restored worker re-reads: what `restore-context.json` carries, no more.
RESTORE_CONTEXT_ENV_NAMES = _KUBERNETES_REQUIRED | _KUBERNETES_OPTIONAL | _RESTORE_RUNTIME


def restore_context(environ: Mapping[str, str]) -> bytes:
    """`restore-context.json` for a restored process whose new environment is `environ`:
    every listed name, its value or null where `environ` lacks it (so the value the
    process had at capture is cleared), as Dynamo's own standby writes it."""
    env = {name: environ.get(name) for name in sorted(RESTORE_CONTEXT_ENV_NAMES)}
    return json.dumps({"env": env}, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def control_dir_env(path: str) -> dict[str, str]:
    """The variables that give a workload its control directory: Dynamo's worker code reads
    `DYN_SNAPSHOT_CONTROL_DIR`, older workers and warmstart's examples `SNAPSHOT_CONTROL_DIR`."""
    return dict.fromkeys(CONTROL_DIR_ENVS, path)
