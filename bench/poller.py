"""Waits for the first 2xx answer from a URL and prints when it came (CLOCK_MONOTONIC).

Runs as its own process so that polling does not steal the measured process's CPU time;
it tries a cheap TCP connect every 0.5 ms and sends the HTTP request only once the port
accepts, so it stays light on a 2-vCPU host.
"""

import socket
import sys
import time
import urllib.request
from urllib.parse import urlsplit


def accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def main(url: str, timeout: float) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if accepts(host, port) and answers(url):
            print(f"{time.monotonic():.6f}", flush=True)
            return
        time.sleep(0.0005)
    sys.exit(f"no answer from {url} within {timeout} s")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 60.0)
