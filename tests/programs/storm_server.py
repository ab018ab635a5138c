"""A restore target for storms: many copies of one checkpoint on one host.

Serves a token chosen at start on `PORT` with SO_REUSEPORT, so that restored copies of one
dump (and cold starts of it) can all listen on the port at once: in local mode they share
the host's network namespace, where on a cluster each pod has its own. `WARMUP_ROUNDS`
rounds of SHA-256 over 1 MiB stand in for loading a model before it listens. Prints
`listening <token>` once it accepts connections.
"""

import hashlib
import http.server
import secrets
import socket
import sys

TOKEN = secrets.token_hex(8)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(TOKEN.encode())

    def log_message(self, *args: object) -> None:
        pass


class Server(http.server.HTTPServer):
    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


weights = bytes(1 << 20)
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 0):
    weights = hashlib.sha256(weights).digest() * (1 << 15)
server = Server(("127.0.0.1", int(sys.argv[1])), Handler)
print("listening", TOKEN, flush=True)
server.serve_forever()
