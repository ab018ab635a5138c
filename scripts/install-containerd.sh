#!/usr/bin/env bash
# Install containerd, runc and iptables from the host's Debian suite when missing (root
# only): the container tests start their own containerd (own root, state and socket) and
# CRIU locks a container's network with iptables-restore.
set -euo pipefail

missing=()
command -v containerd >/dev/null 2>&1 || missing+=(containerd)
command -v runc >/dev/null 2>&1 || missing+=(runc)
command -v iptables-restore >/dev/null 2>&1 || missing+=(iptables)
if [ ${#missing[@]} -eq 0 ]; then
  echo "containerd $(containerd --version | awk '{print $3}'), runc, iptables: ok"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-containerd: not root; ${missing[*]} not installed, container tests will skip" >&2
  exit 0
fi
echo "install-containerd: apt-get install ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The package's own service is not wanted: tests run their own daemon.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet containerd 2>/dev/null; then
  systemctl stop containerd || true
fi
