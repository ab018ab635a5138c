"""Holds MiB of seeded memory and keeps rewriting pages of it (a tenth of them per sweep,
each stamped with its index and generation) while it answers over HTTP: `/check` says
`ok <sweeps> <pages rewritten>` when every page holds what its record says it should, else
`bad <page>`. Arguments: port, MiB, seed."""

import http.server
import random
import sys
import threading

PORT, MIB, SEED = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
PAGE = 4096
RANDOM = random.Random(SEED)
MEMORY = bytearray(b"".join(RANDOM.randbytes(1 << 20) for _ in range(MIB)))
BASE = bytes(MEMORY)  # the seeded content (a second copy, itself never rewritten)
PAGES = len(MEMORY) // PAGE
GENERATION = [0] * PAGES  # the generation each page was last written with (0: seeded)
LOCK = threading.Lock()
SWEEPS = 0


def content(page: int, generation: int) -> bytes:
    head = page.to_bytes(8, "little") + generation.to_bytes(8, "little")
    return head + bytes([generation % 251 + 1]) * (PAGE - 16)


def churn() -> None:
    global SWEEPS
    while True:
        for page in range(SWEEPS % 10, PAGES, 10):
            with LOCK:
                generation = GENERATION[page] + 1
                MEMORY[page * PAGE : (page + 1) * PAGE] = content(page, generation)
                GENERATION[page] = generation
        SWEEPS += 1


def check() -> bytes:
    with LOCK:
        for page in range(PAGES):
            generation = GENERATION[page]
            start = page * PAGE
            want = BASE[start : start + PAGE] if generation == 0 else content(page, generation)
            if MEMORY[start : start + PAGE] != want:
                return f"bad {page}".encode()
        return f"ok {SWEEPS} {sum(1 for g in GENERATION if g)}".encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = check()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


threading.Thread(target=churn, daemon=True).start()
print("holding", MIB, "MiB", flush=True)
http.server.HTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
