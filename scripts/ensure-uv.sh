#!/usr/bin/env bash
# Print a command that runs uv, installing uv with pip first when it is missing.
# Works with a pyenv/venv Python (plain pip install) and with Debian's externally
# managed system Python (user install).
set -euo pipefail
py=${1:-python3}

if command -v uv >/dev/null 2>&1; then command -v uv; exit 0; fi
if "$py" -m uv --version >/dev/null 2>&1; then echo "$py -m uv"; exit 0; fi
if "$py" -m pip install --quiet uv >/dev/null 2>&1 \
   || "$py" -m pip install --quiet --user uv >/dev/null 2>&1 \
   || "$py" -m pip install --quiet --user --break-system-packages uv >/dev/null 2>&1; then
  if "$py" -m uv --version >/dev/null 2>&1; then echo "$py -m uv"; exit 0; fi
fi
echo "ensure-uv: could not install uv with $py -m pip; install uv (https://docs.astral.sh/uv/) and retry" >&2
exit 1
