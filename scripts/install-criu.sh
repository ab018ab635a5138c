#!/usr/bin/env bash
# Install CRIU >= 4.2 from Debian sid's source tarball when the host has none.
# Debian 12 ships 3.17 (fails `criu check` on recent kernels) and 4.1 cannot dump
# TCP sockets on kernels that refuse SO_PASSCRED on inet sockets; 4.2.1 works.
# The built binary is installed to /usr/local/sbin so later runs skip the build.
# CRIU_REMOVE_BUILD_DEPS=1 (an image build) purges the build dependencies this run
# installed once CRIU is built, keeping the libraries the binary links against.
set -euo pipefail

want_major=4
want_minor=2
prefix=${CRIU_PREFIX:-/usr/local}
work=${CRIU_BUILD_DIR:-/var/cache/warmstart/criu-build}

have_good_criu() {
  local bin v
  bin=$(command -v criu 2>/dev/null || true)
  [ -n "$bin" ] || return 1
  v=$("$bin" --version 2>/dev/null | sed -n 's/^Version: *\([0-9.]*\).*/\1/p' | head -1)
  [ -n "$v" ] || return 1
  local major minor
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  if [ "$major" -gt "$want_major" ] || { [ "$major" -eq "$want_major" ] && [ "$minor" -ge "$want_minor" ]; }; then
    echo "criu $v at $bin: ok"
    return 0
  fi
  echo "criu $v at $bin is older than $want_major.$want_minor"
  return 1
}

export PATH="$prefix/sbin:$prefix/bin:$PATH"
if have_good_criu; then exit 0; fi

if [ "$(id -u)" != 0 ]; then
  echo "install-criu: not root; CRIU $want_major.$want_minor cannot be installed, CRIU tests will skip" >&2
  exit 0
fi

# Build dependencies from the host's own suite.
deps=(libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler python3-protobuf
      libnl-3-dev libnet1-dev libcap-dev libbsd-dev pkg-config libgnutls28-dev libnftables-dev
      libaio-dev uuid-dev xz-utils build-essential iproute2)
missing=()
for d in "${deps[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-criu: apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$work"
tarball=$(ls "$work"/criu_4.2*.orig.tar.* 2>/dev/null | head -1 || true)
if [ -z "$tarball" ]; then
  # A private apt configuration pointing at the sid source suite of the host's own mirror,
  # so the system's apt state is left untouched.
  uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1 || true)
  if [ -z "$uri" ]; then
    uri=$(sed -n 's/^deb \(http[^ ]*\) .*/\1/p' /etc/apt/sources.list 2>/dev/null | grep -v security | head -1 || true)
  fi
  if [ -z "$uri" ]; then
    echo "install-criu: no Debian mirror found in the apt sources; install criu >= 4.2 by hand" >&2
    exit 1
  fi
  aptdir="$work/apt"
  mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial"
  cat > "$aptdir/sid.sources" <<SRC
Types: deb-src
URIs: $uri
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  opts=(-o "Dir::Etc::SourceList=$aptdir/sid.sources" -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$aptdir/lists" -o "Dir::Cache::Archives=$aptdir/archives")
  apt-get "${opts[@]}" update -qq
  # The Debian diff may be missing from the mirror, which makes apt exit non-zero
  # after the orig tarball has arrived; the tarball is all the build needs.
  (cd "$work" && apt-get "${opts[@]}" source --download-only criu >/dev/null 2>&1) || true
  tarball=$(ls "$work"/criu_4.2*.orig.tar.* 2>/dev/null | head -1 || true)
  if [ -z "$tarball" ]; then
    echo "install-criu: could not fetch criu 4.2 source from the sid suite" >&2
    exit 1
  fi
fi

src="$work/src"
rm -rf "$src" && mkdir -p "$src"
tar -xf "$tarball" -C "$src" --strip-components=1
echo "install-criu: building $(basename "$tarball")"
make -C "$src" -j"$(nproc)" criu >"$work/build.log" 2>&1 || { tail -30 "$work/build.log" >&2; exit 1; }
install -D -m 0755 "$src/criu/criu" "$prefix/sbin/criu"
# The CUDA plugin is only useful on GPU nodes; build it when the toolchain allows.
if make -C "$src" cuda_plugin >>"$work/build.log" 2>&1; then
  install -D -m 0644 "$src/plugins/cuda/cuda_plugin.so" "$prefix/lib/criu/cuda_plugin.so"
fi

# The package of each library a built file links against (merged /usr: dpkg may know a
# library under /lib or under /usr/lib).
runtime_packages() {
  local lib
  ldd "$@" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | sort -u | while read -r lib; do
    dpkg -S "$lib" 2>/dev/null || dpkg -S "${lib#/usr}" 2>/dev/null || dpkg -S "/usr$lib" 2>/dev/null \
      || { echo "install-criu: no package owns $lib" >&2; return 1; }
  done | cut -d: -f1 | sort -u
}

if [ "${CRIU_REMOVE_BUILD_DEPS:-0}" = 1 ] && [ ${#missing[@]} -gt 0 ]; then
  built=("$prefix/sbin/criu")
  [ -f "$prefix/lib/criu/cuda_plugin.so" ] && built+=("$prefix/lib/criu/cuda_plugin.so")
  keep=$(runtime_packages "${built[@]}")
  # shellcheck disable=SC2086  # one package name per word
  apt-mark manual $keep >/dev/null
  echo "install-criu: removing the build dependencies (keeping $(echo $keep))"
  DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq --auto-remove "${missing[@]}" >/dev/null
  rm -rf "$src" "$work/apt"
fi
have_good_criu
