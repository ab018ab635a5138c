#!/usr/bin/env bash
# Build the warmstart image from deploy/docker/Dockerfile without a registry or a Docker
# engine (root only): a Debian bookworm base made with mmdebstrap from the machine's own apt
# mirror, the Dockerfile built on it with buildah, the result written as a docker-archive
# tarball that `ctr images import`, `docker load` and `podman load` all take.
#
#   scripts/build-image.sh            build unless this tree's image is cached; print its path
#   scripts/build-image.sh --key      print this tree's cache key (nothing is built)
#   scripts/build-image.sh --tarball  print where this tree's tarball is (built or not)
#
# The key hashes every input of the image: the Dockerfile, .dockerignore, this script,
# install-criu.sh, pyproject.toml, uv.lock, README.md and the packages' sources. An unchanged
# tree rebuilds nothing; a changed one rebuilds only the layers after its change (buildah's
# layer cache). The image is named warmstart.dev/warmstart:<key>. A failed build writes its
# reason beside the tarball (<tarball without .tar>.unavailable), for the tests to skip with,
# and exits 1. WARMSTART_IMAGE_CACHE moves the cache (default /var/cache/warmstart/images).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cache=${WARMSTART_IMAGE_CACHE:-/var/cache/warmstart/images}
name=warmstart.dev/warmstart
base_ref=localhost/warmstart-base:bookworm
suite=bookworm
keep=3 # tarballs (and tagged images) of this many most recent keys are kept

inputs() {
  cd "$root" || exit 1
  printf '%s\0' deploy/docker/Dockerfile .dockerignore scripts/build-image.sh \
    scripts/install-criu.sh pyproject.toml uv.lock README.md
  find api activities workflows workers examples -type f \
    ! -path '*/__pycache__/*' ! -name '*.pyc' -print0
}

tree_key() {
  inputs | LC_ALL=C sort -z | (cd "$root" && xargs -0 sha256sum) | sha256sum | cut -c1-16
}

key=$(tree_key)
[ ${#key} -eq 16 ] || { echo "build-image: cannot hash the image's inputs" >&2; exit 1; }
ref="$name:$key"
tarball="$cache/warmstart-$key.tar"
marker="$cache/warmstart-$key.unavailable"

case "${1:-}" in
  --key) echo "$key"; exit 0 ;;
  --tarball) echo "$tarball"; exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--key|--tarball]" >&2; exit 2 ;;
esac

if [ -s "$tarball" ]; then echo "$tarball"; exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "build-image: not root; the image cannot be built here, its tests will skip" >&2
  exit 1
fi

mkdir -p "$cache"
exec 9>"$cache/build.lock"
flock 9 # one build at a time: they share the layer store (and the machine's cores)
if [ -s "$tarball" ]; then echo "$tarball"; exit 0; fi
rm -f "$marker"
log="$cache/warmstart-$key.log"
: >"$log"
fail() { # the reason, with the last line the failed step logged
  local last
  last=$(grep -v '^\s*$' "$log" 2>/dev/null | tail -1 | cut -c1-300)
  echo "build-image: $1${last:+: $last}" >&2
  echo "$1${last:+: $last}" >"$marker"
  exit 1
}

missing=()
command -v buildah >/dev/null 2>&1 || missing+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "build-image: apt-get install ${missing[*]}" >&2
  apt-get update -qq 9>&- || fail "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null 9>&- || fail "apt-get install ${missing[*]} failed"
fi

# A store of the build's own, so the machine's container storage is never touched.
buildah_() {
  buildah --root "$cache/containers" --runroot /run/warmstart-buildah "$@" 9>&-
}

# The base: a minimal Debian from the mirror the machine's apt uses, without documentation,
# manuals or translations. The mirror's validity options go with it (a mirror serving a
# dated snapshot has expired Release files, also for the sid sources CRIU is built from).
make_base() {
  local uri security sources opts line tar c
  uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 || true)
  [ -n "$uri" ] || uri=$(sed -n 's/^deb \(http[^ ]*\) .*/\1/p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 || true)
  [ -n "$uri" ] || fail "no Debian mirror in the apt sources to make the base image from"
  security=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep security | head -1 || true)
  [ -n "$security" ] || security=$(sed -n 's/^deb \(http[^ ]*\) .*/\1/p' /etc/apt/sources.list 2>/dev/null | grep security | head -1 || true)
  sources=("deb $uri $suite main" "deb $uri $suite-updates main")
  [ -z "$security" ] || sources+=("deb $security $suite-security main")
  opts=()
  while read -r line; do
    [ -n "$line" ] && opts+=("--aptopt=$line")
  done < <(apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date) ' || true)
  for path in /usr/share/doc/ /usr/share/man/ /usr/share/info/ /usr/share/locale/; do
    opts+=("--dpkgopt=path-exclude=$path*")
  done
  opts+=("--dpkgopt=path-include=/usr/share/doc/*/copyright")
  tar="$cache/base-$suite.tar"
  echo "build-image: making the $suite base with mmdebstrap" >&2
  mmdebstrap --variant=minbase "${opts[@]}" "$suite" "$tar" "${sources[@]}" >>"$log" 2>&1 9>&- \
    || fail "mmdebstrap could not make the $suite base (see $log)"
  c=$(buildah_ from scratch) || fail "buildah cannot create a container (see $log)"
  buildah_ add "$c" "$tar" / >>"$log" 2>&1 \
    && buildah_ config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --cmd bash "$c" >>"$log" 2>&1 \
    && buildah_ commit -q "$c" "$base_ref" >>"$log" 2>&1 \
    || { buildah_ rm "$c" >/dev/null 2>&1; rm -f "$tar"; fail "buildah could not import the base (see $log)"; }
  buildah_ rm "$c" >/dev/null 2>&1
  rm -f "$tar"
}

started=$(date +%s)
renice -n 10 -p $$ >/dev/null # a long build beside other work: everything below runs niced
buildah_ inspect --type image "$base_ref" >/dev/null 2>&1 || make_base

# pip and uv inside the build trust what this machine trusts (a TLS proxy to PyPI, say).
ca_args=()
ca=$(realpath -q /etc/ssl/certs/ca-certificates.crt || true)
if [ -n "$ca" ] && [ -s "$ca" ]; then
  ca_args=(--volume "$ca:/run/build-ca.crt:ro" --build-arg CA_BUNDLE=/run/build-ca.crt)
fi

echo "build-image: building $ref (log: $log)" >&2
# chroot isolation: the build's RUN steps share the machine's network and need no user or
# network namespaces set up by a runtime.
buildah_ bud --isolation chroot --layers --pull=never \
  --build-arg "BASE=$base_ref" "${ca_args[@]}" \
  -f "$root/deploy/docker/Dockerfile" -t "$ref" "$root" >>"$log" 2>&1 \
  || fail "buildah bud failed (see $log)"
rm -f "$tarball.partial"
buildah_ push -q "$ref" "docker-archive:$tarball.partial:$ref" >>"$log" 2>&1 \
  || { rm -f "$tarball.partial"; fail "buildah push to a docker-archive failed (see $log)"; }
mv "$tarball.partial" "$tarball"
echo "build-image: $ref in $(($(date +%s) - started)) s, $(du -m "$tarball" | cut -f1) MiB" >&2

# Older keys: their tarballs and tags go, the layers they share with newer images stay.
ls -t "$cache"/warmstart-*.tar 2>/dev/null | tail -n +$((keep + 1)) | while read -r old; do
  stale=$(basename "$old" .tar)
  rm -f "$old" "$cache/$stale.log" "$cache/$stale.unavailable"
  buildah_ rmi "$name:${stale#warmstart-}" >/dev/null 2>&1 || true
done
echo "$tarball"
