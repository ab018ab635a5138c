#!/usr/bin/env bash
# Build the node side of a real one-node cluster for the real-node test tier: kubelet,
# kube-scheduler, kube-controller-manager and kubectl (1.20, from the same Debian
# `kubernetes` source package as the API server), a static `pause` for the pod sandbox,
# and Debian's CNI plugins. Built once, in one `make` (minutes); installed into a
# directory of their own, not on PATH: the host may have another kubectl, and the tests
# call these by absolute path.
# A failed build does not fail `make test`: the reason is written to $marker and the
# real-node tests skip with it.
set -uo pipefail

work=${KUBE_BUILD_DIR:-/var/cache/warmstart/kube-build}
bindir=${KUBE_NODE_BIN_DIR:-/usr/local/lib/warmstart/kube/bin}
marker=/var/cache/warmstart/kube-node.unavailable
targets=(kubelet kube-scheduler kube-controller-manager kubectl)
cni=/usr/lib/cni

have_all() {
  local t
  for t in "${targets[@]}" pause; do [ -x "$bindir/$t" ] || return 1; done
  [ -x "$cni/bridge" ] && [ -x "$cni/host-local" ] && [ -x "$cni/loopback" ]
}
if have_all; then
  echo "kube node binaries $("$bindir/kubelet" --version 2>/dev/null | awk '{print $2}'), CNI plugins: ok"
  rm -f "$marker"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-kube-node: not root; the real-node tests will skip" >&2
  exit 0
fi
mkdir -p "$work" "$(dirname "$marker")"
fail() { echo "install-kube-node: $1" >&2; echo "$1" > "$marker"; exit 0; }

deps=(golang-go rsync golang-github-modern-go-reflect2-dev containernetworking-plugins gcc libc6-dev)
missing=()
for d in "${deps[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-kube-node: apt-get install ${missing[*]}"
  apt-get update -qq || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null || fail "apt-get install ${missing[*]} failed"
fi
have_all && { rm -f "$marker"; exit 0; }

# The same cached source tarball as the API server's.
tarball=$(bash "$(dirname "$0")/fetch-kube-source.sh" "$work" 2>"$work/fetch.err") \
  || fail "$(tail -1 "$work/fetch.err")"

# A source tree of this script's own: the API-server script removes its own tree.
src="$work/node-src"
rm -rf "$src" && mkdir -p "$src"
tar -xzf "$tarball" -C "$src" --strip-components=1 || fail "cannot unpack $tarball"
rm -rf "$src/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$src/vendor/github.com/modern-go/reflect2"
what=""
for t in "${targets[@]}"; do what="$what cmd/$t"; done
echo "install-kube-node: building${what} from $(basename "$tarball") (about ten minutes)"
start=$(date +%s)
nice -n 19 make -C "$src" WHAT="${what# }" >"$work/node-build.log" 2>&1 \
  || { tail -20 "$work/node-build.log" >&2; fail "the kube node build failed (see $work/node-build.log)"; }
gcc -static -Os -o "$src/_output/bin/pause" "$src/build/pause/linux/pause.c" \
  -DVERSION=warmstart >>"$work/node-build.log" 2>&1 \
  || fail "the static pause build failed (see $work/node-build.log)"
mkdir -p "$bindir"
for t in "${targets[@]}" pause; do
  install -m 0755 "$src/_output/bin/$t" "$bindir/$t" || fail "cannot install $t into $bindir"
done
rm -rf "$src"
rm -f "$marker"
echo "install-kube-node: kubelet $("$bindir/kubelet" --version | awk '{print $2}') and the rest installed in $bindir ($(( $(date +%s) - start )) s)"
