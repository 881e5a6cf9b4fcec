#!/usr/bin/env bash
# prometheus and promtool from Debian bookworm's `prometheus` package, without installing
# it (no root, no service): `apt-get download` the .deb (or, when apt has no package
# lists, fetch it from the mirror through the signed Release -> Packages -> .deb hash
# chain), `dpkg-deb -x` it, keep the two binaries under ~/.cache/lethe/prometheus-VERSION.
# Prints that directory as the last line of stdout; instant when it is cached.
# PROMETHEUS_DEB_VERSION pins a version (e.g. 2.42.0+ds-5+deb12u1); LETHE_PROMETHEUS_FROM_INDEX=1
# skips apt-get and uses the mirror's index directly.
set -euo pipefail
CACHE="${LETHE_CACHE:-$HOME/.cache/lethe}"
WANT="${PROMETHEUS_DEB_VERSION:-}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
KEYRING="${DEBIAN_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}"

usable() { [ -x "$1/prometheus" ] && [ -x "$1/promtool" ]; }

# A cached copy: the pinned version, else the newest one there.
if [ -n "$WANT" ]; then
  if usable "$CACHE/prometheus-$WANT"; then echo "$CACHE/prometheus-$WANT"; exit 0; fi
else
  for d in $(ls -d "$CACHE"/prometheus-*/ 2>/dev/null | sort -rV); do
    if usable "${d%/}"; then echo "${d%/}"; exit 0; fi
  done
fi

for tool in dpkg-deb curl sha256sum xz; do
  command -v "$tool" >/dev/null || { echo "get-prometheus: $tool is needed" >&2; exit 1; }
done
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"
ARCH=$(dpkg --print-architecture)

# The fallback: find prometheus in the suites' Packages indexes, each verified against
# the suite's InRelease (itself checked with gpgv against Debian's keyring when there).
from_index() {
  local best_ver="" best_file="" best_sha=""
  for suite in bookworm bookworm-updates; do
    local rel="$TMP/$suite.InRelease" idx="dists/$suite/main/binary-$ARCH/Packages.xz"
    curl -fsSL "$MIRROR/dists/$suite/InRelease" -o "$rel" || continue
    if command -v gpgv >/dev/null && [ -r "$KEYRING" ]; then
      gpgv --keyring "$KEYRING" "$rel" 2>/dev/null \
        || { echo "get-prometheus: bad signature on $suite/InRelease" >&2; exit 1; }
    fi
    local want_sha
    want_sha=$(awk -v f="main/binary-$ARCH/Packages.xz" \
      '/^SHA256:/{s=1;next} /^[A-Za-z]/{s=0} s && $3==f {print $1}' "$rel")
    [ -n "$want_sha" ] || continue
    curl -fsSL "$MIRROR/$idx" -o "$TMP/$suite.Packages.xz"
    echo "$want_sha  $TMP/$suite.Packages.xz" | sha256sum -c --quiet - >&2
    # one "version filename sha256" line per prometheus stanza
    xz -dc "$TMP/$suite.Packages.xz" | awk '
      /^Package: /{p=($2=="prometheus"); v=f=h=""}
      p && /^Version: /{v=$2} p && /^Filename: /{f=$2} p && /^SHA256: /{h=$2}
      /^$/{if (p && v!="") print v, f, h; p=0}' > "$TMP/$suite.found"
    while read -r ver file sha; do
      if [ -n "$WANT" ] && [ "$ver" != "$WANT" ]; then continue; fi
      if [ -z "$best_ver" ] || dpkg --compare-versions "$ver" gt "$best_ver"; then
        best_ver=$ver best_file=$file best_sha=$sha
      fi
    done < "$TMP/$suite.found"
  done
  [ -n "$best_ver" ] || { echo "get-prometheus: prometheus ${WANT:-any} not in bookworm" >&2; exit 1; }
  curl -fsSL "$MIRROR/$best_file" -o "$TMP/prometheus.deb"
  echo "$best_sha  $TMP/prometheus.deb" | sha256sum -c --quiet - >&2
}

if [ "${LETHE_PROMETHEUS_FROM_INDEX:-0}" != 1 ] && command -v apt-get >/dev/null \
  && apt-get download "prometheus${WANT:+=$WANT}" >&2 2>"$TMP/apt.err"; then
  mv prometheus_*.deb "$TMP/prometheus.deb"
else
  if [ -s "$TMP/apt.err" ]; then grep -v 'unsandboxed' "$TMP/apt.err" >&2 || true; fi
  from_index
fi

VERSION=$(dpkg-deb -f "$TMP/prometheus.deb" Version)
dpkg-deb -x "$TMP/prometheus.deb" "$TMP/x"
DEST="$CACHE/prometheus-$VERSION"
mkdir -p "$DEST.tmp"
cp "$TMP/x/usr/bin/prometheus" "$TMP/x/usr/bin/promtool" "$DEST.tmp/"
"$DEST.tmp/promtool" --version >&2
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "$DEST"
