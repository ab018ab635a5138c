#!/usr/bin/env bash
# Build a real kube-apiserver (1.20, from Debian 12's `kubernetes` source package) and
# install Debian's etcd, for the integration tier of the tests (envtest's pattern: a real
# API server, no nodes). Built once; the binary is kept in /usr/local/bin.
# Debian ships no kube-apiserver binary. The vendored modern-go/reflect2 1.0.1 crashes
# under Go >= 1.18: Debian's 1.0.2 replaces it.
# A failed build does not fail `make test`: the reason is written to $marker and the
# integration tests skip with it.
set -uo pipefail

work=${KUBE_BUILD_DIR:-/var/cache/warmstart/kube-build}
marker=/var/cache/warmstart/kube-apiserver.unavailable
if command -v kube-apiserver >/dev/null 2>&1 && command -v etcd >/dev/null 2>&1; then
  echo "kube-apiserver $(kube-apiserver --version 2>/dev/null | awk '{print $2}'), etcd: ok"
  rm -f "$marker"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-kube-apiserver: not root; the API-server integration tests will skip" >&2
  exit 0
fi
mkdir -p "$work" "$(dirname "$marker")"
fail() { echo "install-kube-apiserver: $1" >&2; echo "$1" > "$marker"; exit 0; }

deps=(golang-go rsync golang-github-modern-go-reflect2-dev etcd-server)
missing=()
for d in "${deps[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-kube-apiserver: apt-get install ${missing[*]}"
  apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null || fail "apt-get install ${missing[*]} failed"
fi
command -v kube-apiserver >/dev/null 2>&1 && { rm -f "$marker"; exit 0; }

tarball=$(bash "$(dirname "$0")/fetch-kube-source.sh" "$work" 2>"$work/fetch.err") \
  || fail "$(tail -1 "$work/fetch.err")"

src="$work/src"
rm -rf "$src" && mkdir -p "$src"
tar -xzf "$tarball" -C "$src" --strip-components=1 || fail "cannot unpack $tarball"
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
echo "install-kube-apiserver: building kube-apiserver from $(basename "$tarball") (minutes)"
make -C "$src" WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1 \
  || { tail -20 "$work/build.log" >&2; fail "the kube-apiserver build failed (see $work/build.log)"; }
install -m 0755 "$src/_output/bin/kube-apiserver" /usr/local/bin/kube-apiserver
rm -rf "$src"
rm -f "$marker"
echo "kube-apiserver $(kube-apiserver --version | awk '{print $2}'): installed"
