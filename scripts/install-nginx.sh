#!/usr/bin/env bash
# Install nginx from the host's Debian suite when missing (root only): the TLS tests put it
# in front of the Temporal dev server as a gRPC TLS terminator that requires client
# certificates (it negotiates HTTP/2 by ALPN, as Temporal's clients require).
set -euo pipefail

if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  echo "nginx: ok"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-nginx: not root; nginx not installed, the Temporal TLS tests will skip" >&2
  exit 0
fi
echo "install-nginx: apt-get install nginx-light"
if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends nginx-light >/dev/null; }; then
  echo "install-nginx: apt-get failed; the Temporal TLS tests will skip" >&2
fi
# The package's own service is not wanted: tests run their own terminator.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
  systemctl stop nginx || true
elif [ -s /run/nginx.pid ]; then
  kill "$(cat /run/nginx.pid)" 2>/dev/null || true
fi
