"""CPU stand-in for an LLM inference worker: slow deterministic warm-up, then a tiny HTTP API.
Speaks the Dynamo snapshot sentinel protocol so CRIU can checkpoint and restore it."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import json
import os
import re
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import FrameType
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8088
# Calibrated to about 12 s of warm-up on a 2-core x86 machine.
DEFAULT_WARMUP_ROUNDS = 4900

VOCAB_SIZE = 512
EMBED_DIM = 8
SUCCESSORS = 4
MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]

DEFAULT_MAX_TOKENS = 16
MAX_MAX_TOKENS = 256
MAX_BODY_BYTES = 1 << 20

READY_FILE = "ready-for-snapshot"
SNAPSHOT_DONE_FILE = "snapshot-complete"
RESTORE_DONE_FILE = "restore-complete"
CONTROL_DIR_ENVS = ("SNAPSHOT_CONTROL_DIR", "DYN_SNAPSHOT_CONTROL_DIR")
POLL_SECONDS = 0.1

# Chosen once per process; a CRIU restore brings back memory, so it survives restore but
# differs between cold starts, which lets callers tell the two apart.
INSTANCE_ID = uuid.uuid4().hex


def log(message: str) -> None:
    print(f"inference-worker: {message}", flush=True)


# ---------------------------------------------------------------------------
# The "model"
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    vocab: tuple[str, ...]
    index: dict[str, int]
    successors: tuple[tuple[int, ...], ...]
    state_digest: str


def build_vocab() -> tuple[str, ...]:
    # Multiplying by a unit mod 70**2 permutes syllable pairs, so words stay unique but varied.
    space = len(SYLLABLES) ** 2
    words = []
    for i in range(VOCAB_SIZE):
        j = (i * 1543 + 211) % space
        words.append(SYLLABLES[j // len(SYLLABLES)] + SYLLABLES[j % len(SYLLABLES)])
    return tuple(words)


def initial_embeddings(vocab: Sequence[str]) -> list[list[int]]:
    rows = []
    for word in vocab:
        seed = hashlib.sha512(b"warmstart-vocab:" + word.encode()).digest()
        rows.append([int.from_bytes(seed[k * 8 : k * 8 + 8], "little") for k in range(EMBED_DIM)])
    return rows


def rotl64(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & MASK64


def mix_round(rows: list[list[int]], rnd: int) -> None:
    """One round of state mixing: every row absorbs a neighbour row and a hash of itself."""
    salt = rnd.to_bytes(4, "little")
    for i, row in enumerate(rows):
        other = rows[(i * 31 + rnd + 1) % VOCAB_SIZE]
        digest = hashlib.sha256(salt + row[0].to_bytes(8, "little")).digest()
        h = int.from_bytes(digest[:8], "little")
        for k in range(EMBED_DIM):
            x = row[k] ^ rotl64(other[(k + rnd) % EMBED_DIM], (k * 7 + rnd) % 63 + 1)
            row[k] = ((x ^ h) * GOLDEN64 + k) & MASK64
            h = rotl64(h, 13) ^ row[k]


def affinity(a: Sequence[int], b: Sequence[int]) -> int:
    x = (a[0] ^ rotl64(b[1], 17)) * GOLDEN64 + (a[2] ^ b[3])
    return (x & MASK64) >> 16


def derive_successors(rows: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    # The "bigram table": each token's most affine next tokens, excluding itself so that
    # greedy decoding does not stall on a single word.
    return tuple(top_successors(rows, t) for t in range(len(rows)))


def top_successors(rows: Sequence[Sequence[int]], t: int) -> tuple[int, ...]:
    def score(c: int) -> int:
        return affinity(rows[t], rows[c])

    return tuple(heapq.nlargest(SUCCESSORS, (c for c in range(len(rows)) if c != t), key=score))


def digest_state(rows: Sequence[Sequence[int]], successors: Sequence[Sequence[int]]) -> str:
    h = hashlib.sha256()
    for row in rows:
        for value in row:
            h.update(value.to_bytes(8, "little"))
    for succ in successors:
        for c in succ:
            h.update(c.to_bytes(2, "little"))
    return h.hexdigest()


def warm_up(rounds: int) -> Model:
    vocab = build_vocab()
    rows = initial_embeddings(vocab)
    for rnd in range(rounds):
        mix_round(rows, rnd)
    successors = derive_successors(rows)
    return Model(
        vocab=vocab,
        index={word: i for i, word in enumerate(vocab)},
        successors=successors,
        state_digest=digest_state(rows, successors),
    )


def tokenize(model: Model, prompt: str) -> list[int]:
    # Out-of-vocabulary words hash onto the vocabulary so every prompt has a defined answer.
    ids = []
    for word in re.findall(r"[a-z0-9']+", prompt.lower()):
        known = model.index.get(word)
        if known is None:
            known = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            known %= VOCAB_SIZE
        ids.append(known)
    return ids


def generate(model: Model, prompt: str, max_tokens: int) -> list[int]:
    context = tokenize(model, prompt)
    h = int.from_bytes(hashlib.sha256(repr(context).encode()).digest()[:8], "little")
    prev = context[-1] if context else h % VOCAB_SIZE
    out = []
    for _ in range(max_tokens):
        prev = model.successors[prev][h % SUCCESSORS]
        out.append(prev)
        h = rotl64((h ^ prev) * GOLDEN64 & MASK64, 29)
    return out


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------


@dataclass
class WorkerState:
    model: Model
    warmup_seconds: float
    restored: bool = False
    requests_served: int = 0

    def info(self) -> dict[str, Any]:
        return {
            "instance_id": INSTANCE_ID,
            "pid": os.getpid(),
            "state_digest": self.model.state_digest,
            "warmup_seconds": round(self.warmup_seconds, 3),
            "requests_served": self.requests_served,
            "restored": self.restored,
        }


class BadRequest(ValueError):
    pass


def parse_generate_body(raw: bytes) -> tuple[str, int]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"invalid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise BadRequest("'prompt' is required and must be a string")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    # bool is an int subclass; reject it explicitly so `true` is not read as 1.
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadRequest("'max_tokens' must be an integer")
    if not 1 <= max_tokens <= MAX_MAX_TOKENS:
        raise BadRequest(f"'max_tokens' must be between 1 and {MAX_MAX_TOKENS}")
    return prompt, max_tokens


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0 closes the connection after each response, so no idle keep-alive sockets
    # linger into a later checkpoint.
    protocol_version = "HTTP/1.0"
    server: WorkerServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self.send_text(HTTPStatus.OK, "ok")
        elif self.path == "/info":
            self.send_json(HTTPStatus.OK, self.server.state.info())
        else:
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no route for GET {self.path}"})

    def do_POST(self) -> None:
        if self.path != "/generate":
            self.send_json(HTTPStatus.NOT_FOUND, {"error": f"no route for POST {self.path}"})
            return
        try:
            prompt, max_tokens = parse_generate_body(self.read_body())
        except BadRequest as exc:
            self.send_json(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            return
        state = self.server.state
        tokens = generate(state.model, prompt, max_tokens)
        completion = " ".join(state.model.vocab[t] for t in tokens)
        self.send_json(HTTPStatus.OK, {"completion": completion, "tokens": tokens})

    def read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError as exc:
            raise BadRequest("invalid Content-Length") from exc
        if not 0 <= length <= MAX_BODY_BYTES:
            raise BadRequest(f"body must be at most {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length)

    def send_text(self, status: HTTPStatus, text: str) -> None:
        self.send_bytes(status, text.encode(), "text/plain; charset=utf-8")

    def send_json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), "application/json")

    def send_bytes(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.server.state.requests_served += 1
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class WorkerServer(HTTPServer):
    # Single-threaded on purpose: requests are cheap, and no worker threads exist to
    # complicate a checkpoint or the shared counters.
    def __init__(self, address: tuple[str, int], state: WorkerState) -> None:
        super().__init__(address, Handler)
        self.state = state


# ---------------------------------------------------------------------------
# Snapshot sentinel protocol
# ---------------------------------------------------------------------------


def control_dir_from_env() -> str | None:
    for name in CONTROL_DIR_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def write_atomically(path: str, content: str) -> None:
    # Watchers must never see a half-written sentinel, so write aside and rename into place.
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def wait_for_snapshot_outcome(control_dir: str) -> bool:
    """Block until the controller says what happened; True means we are a restored copy."""
    # Only stat the sentinels: any fd held here would be captured in the checkpoint and
    # would have to exist again at restore time.
    restore = os.path.join(control_dir, RESTORE_DONE_FILE)
    snapshot = os.path.join(control_dir, SNAPSHOT_DONE_FILE)
    while True:
        # restore-complete wins: a restored process may still see the capture's
        # snapshot-complete if the control dir is reused.
        if os.path.exists(restore):
            return True
        if os.path.exists(snapshot):
            return False
        time.sleep(POLL_SECONDS)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def install_signal_handlers() -> None:
    # As PID 1 of a PID namespace the kernel ignores default dispositions, so without
    # explicit handlers SIGTERM would be silently dropped.
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log(f"received {signal.Signals(signum).name}, exiting")
        raise SystemExit(0 if signum == signal.SIGTERM else 128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument(
        "--warmup-rounds",
        type=positive_int,
        default=None,
        help=f"state-mixing rounds (env WARMUP_ROUNDS; default {DEFAULT_WARMUP_ROUNDS})",
    )
    args = parser.parse_args(argv)
    if args.warmup_rounds is None:
        env = os.environ.get("WARMUP_ROUNDS")
        try:
            args.warmup_rounds = positive_int(env) if env else DEFAULT_WARMUP_ROUNDS
        except argparse.ArgumentTypeError as exc:
            parser.error(f"WARMUP_ROUNDS: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    install_signal_handlers()
    log(f"instance {INSTANCE_ID} pid {os.getpid()}: warming up ({args.warmup_rounds} rounds)")
    started = time.perf_counter()
    model = warm_up(args.warmup_rounds)
    elapsed = time.perf_counter() - started
    log(f"warm-up done in {elapsed:.1f} s, state digest {model.state_digest}")

    state = WorkerState(model=model, warmup_seconds=elapsed)
    # Bound before the snapshot so the listening socket is part of the checkpoint.
    with WorkerServer((args.host, args.port), state) as server:
        control_dir = control_dir_from_env()
        if control_dir is not None:
            write_atomically(os.path.join(control_dir, READY_FILE), "ready\n")
            log(f"ready for snapshot, watching {control_dir}")
            if not wait_for_snapshot_outcome(control_dir):
                log("snapshot complete, exiting")
                return 0
            state.restored = True
            log("restore complete")
        log(f"serving on {args.host}:{server.server_port}")
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
