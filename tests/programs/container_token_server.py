"""A container workload with state in memory and in its root: serves a random token chosen at
start on 127.0.0.1, keeps it in /var/lib/token too and removes its image's
/etc/warmstart-image (changes a root filesystem diff carries), says ready-for-snapshot, and
prints a line to stdout for every request (what the container's log then shows)."""

import http.server
import os
import secrets
import sys

TOKEN = secrets.token_hex(8)
served = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        global served
        served += 1
        print("served", served, TOKEN, flush=True)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(TOKEN.encode())

    def log_message(self, *args: object) -> None:
        pass


os.makedirs("/var/lib", exist_ok=True)
with open("/var/lib/token", "w") as state:
    state.write(TOKEN + "\n")
if os.path.exists("/etc/warmstart-image"):
    os.remove("/etc/warmstart-image")
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print("token", TOKEN, flush=True)
control = os.environ.get("SNAPSHOT_CONTROL_DIR")
if control:
    with open(os.path.join(control, "ready-for-snapshot"), "w"):
        pass
server.serve_forever()
