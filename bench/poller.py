"""Waits for the first 2xx answer from a URL and prints when it came (CLOCK_MONOTONIC).

Runs as its own process so that polling does not steal the measured process's CPU time.
"""

import sys
import time
import urllib.request


def main(url: str, timeout: float) -> None:
    print("ready", flush=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if 200 <= response.status < 300:
                    print(f"{time.monotonic():.6f}", flush=True)
                    return
        except OSError:
            time.sleep(0.0005)
    sys.exit(f"no answer from {url} within {timeout} s")


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 60.0)
