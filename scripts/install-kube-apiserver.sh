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

tarball=$(ls "$work"/kubernetes_*.orig.tar.gz 2>/dev/null | head -1 || true)
if [ -z "$tarball" ]; then
  suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 || true)
  [ -n "$uri" ] || uri=$(sed -n 's/^deb \(http[^ ]*\) .*/\1/p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 || true)
  [ -n "$uri" ] || fail "no Debian mirror in the apt sources to fetch the kubernetes source from"
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
  apt-get "${opts[@]}" update -qq || fail "apt-get update of the source index failed"
  (cd "$work" && apt-get "${opts[@]}" source --download-only kubernetes >/dev/null 2>&1) || true
  tarball=$(ls "$work"/kubernetes_*.orig.tar.gz 2>/dev/null | head -1 || true)
  [ -n "$tarball" ] || fail "could not fetch Debian's kubernetes source package"
fi

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
