"""Holds MiB of memory filled from a seeded generator (never zero pages) and answers over
HTTP: `/` touches a few pages only (the bytes at 16 fixed offsets), `/digest` every page
(the SHA-256 of all of it). Arguments: port, MiB, seed."""

import hashlib
import http.server
import random
import sys

PORT, MIB, SEED = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
RANDOM = random.Random(SEED)
MEMORY = b"".join(RANDOM.randbytes(1 << 20) for _ in range(MIB))
OFFSETS = [(len(MEMORY) - 1) * i // 15 for i in range(16)]


def answer(path: str) -> bytes:
    if path == "/digest":
        return hashlib.sha256(MEMORY).hexdigest().encode()
    return " ".join(str(MEMORY[offset]) for offset in OFFSETS).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = answer(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


print("holding", MIB, "MiB", flush=True)
http.server.HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
