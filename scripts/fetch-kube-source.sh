#!/usr/bin/env bash
# Fetch Debian's `kubernetes` source package (its orig tarball: 1.20, dependencies vendored)
# into the build cache given as $1, once, through an apt configuration of its own (the
# system's apt state is left alone); print the tarball's path. Used by the kube-apiserver
# and kube-node installs. Exits non-zero with the reason on stderr when it cannot.
set -uo pipefail

work=$1
tarball=$(ls "$work"/kubernetes_*.orig.tar.gz 2>/dev/null | head -1 || true)
if [ -n "$tarball" ]; then echo "$tarball"; exit 0; fi
mkdir -p "$work"
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 || true)
[ -n "$uri" ] || uri=$(sed -n 's/^deb \(http[^ ]*\) .*/\1/p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 || true)
[ -n "$uri" ] || { echo "no Debian mirror in the apt sources to fetch the kubernetes source from" >&2; exit 1; }
aptdir="$work/apt"
mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial"
cat > "$aptdir/src.sources" <<SRC
Types: deb-src
URIs: $uri
Suites: $suite
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
opts=(-o "Dir::Etc::SourceList=$aptdir/src.sources" -o Dir::Etc::SourceParts=/dev/null
      -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache::Archives=$aptdir/archives")
apt-get "${opts[@]}" update -qq >&2 || { echo "apt-get update of the source index failed" >&2; exit 1; }
# It exits non-zero when the Debian diff is missing; the orig tarball is all that is needed.
(cd "$work" && apt-get "${opts[@]}" source --download-only kubernetes >/dev/null 2>&1) || true
tarball=$(ls "$work"/kubernetes_*.orig.tar.gz 2>/dev/null | head -1 || true)
[ -n "$tarball" ] || { echo "could not fetch Debian's kubernetes source package" >&2; exit 1; }
echo "$tarball"
