"""A worker instrumented the way Dynamo 1.6 backends are, with Dynamo's own code (the
`ai-dynamo` wheel's `dynamo.common.snapshot`, on PYTHONPATH), not a copy of it:

- `maybe_run_restore_standby_mode()` first: with `SNAPSHOT_RESTORE_STANDBY=1` the image is
  its own restore standby (writes `restore-context.json`, execs `sleep infinity`);
- warm up (a random token and some memory), listen, then
  `SnapshotConfig.from_env().run_lifecycle(...)` when `DYN_SNAPSHOT_CONTROL_DIR` is set:
  `ready-for-snapshot`, then `snapshot-complete` (exit: the capture is done) or
  `restore-complete` (restored: `apply_snapshot_restore_env()`, then serve);
- GET / answers JSON: the token, whether it was restored, and the identity variables as the
  process sees them now.

Usage: dynamo_worker.py PORT
"""

import asyncio
import http.server
import json
import os
import secrets
import sys
import threading

from dynamo.common.snapshot.lifecycle import SnapshotConfig
from dynamo.common.snapshot.restore_context import (
    apply_snapshot_restore_env,
    maybe_run_restore_standby_mode,
)

IDENTITY = ("POD_NAME", "POD_UID", "POD_NAMESPACE", "DYN_NAMESPACE", "DYN_SYSTEM_PORT")

maybe_run_restore_standby_mode()

TOKEN = secrets.token_hex(8)
WEIGHTS = bytearray(os.urandom(2 << 20))
state = {"restored": False, "applied": {}}


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = {
            "token": TOKEN,
            "restored": state["restored"],
            "applied": state["applied"],
            "env": {name: os.environ.get(name) for name in IDENTITY},
        }
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())

    def log_message(self, *args: object) -> None:
        pass


class Pause:
    """What a backend's pause controller does before a snapshot (release the KV cache)."""

    async def pause(self) -> None:
        print("paused", TOKEN, flush=True)


server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
config = SnapshotConfig.from_env()
if config is not None:
    restored = asyncio.run(config.run_lifecycle(Pause()))
    if not restored:
        print("snapshot complete", TOKEN, flush=True)
        sys.exit(0)
    state["applied"] = apply_snapshot_restore_env()
    state["restored"] = True
    print("restored", TOKEN, os.environ.get("POD_NAME"), flush=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
threading.Event().wait()
