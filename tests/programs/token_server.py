"""A program that knows nothing of sentinels: serves a random token chosen at start."""

import http.server
import secrets
import sys

TOKEN = secrets.token_hex(8)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(TOKEN.encode())

    def log_message(self, *args: object) -> None:
        pass


print("token", TOKEN, flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
