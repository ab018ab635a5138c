"""Serves only as the process it started as: its start time (/proc/self/stat) is read at
start and again on each request, and once it differs (a restored copy is a new process,
whatever its PID) it answers 503, as a worker whose lease or licence is bound to its
process would. Prints its start time; argument: port."""

import http.server
import sys


def start_ticks() -> str:
    with open("/proc/self/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[19]


STARTED = start_ticks()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        same = start_ticks() == STARTED
        self.send_response(200 if same else 503)
        self.end_headers()
        self.wfile.write(b"serving" if same else b"not the process that started")

    def log_message(self, *args: object) -> None:
        pass


print("started at", STARTED, flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
