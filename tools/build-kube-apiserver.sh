#!/usr/bin/env bash
# Build kube-apiserver from the k8s.io/kubernetes Go module (no Docker, no release
# download): require it, replace every k8s.io staging module with its v0.x twin,
# `go build`. The binary is cached under ~/.cache/lethe, so later runs are instant.
# Prints the path of the binary.
set -euo pipefail
VERSION="${KUBE_VERSION:-v1.33.13}"
STAGING="v0.${VERSION#v1.}"
CACHE="${LETHE_CACHE:-$HOME/.cache/lethe}"
BIN="$CACHE/bin/kube-apiserver-$VERSION"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v go >/dev/null || { echo "go is needed to build kube-apiserver" >&2; exit 1; }
WORK="$CACHE/build/kube-apiserver-$VERSION"
mkdir -p "$WORK" "$CACHE/bin"
cd "$WORK"
modfile=$(go mod download -json "k8s.io/kubernetes@$VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
{
  echo "module lethe.dev/kube-build"
  echo
  echo "go 1.24"
  echo
  echo "require k8s.io/kubernetes $VERSION"
  echo
  # every staging module kubernetes requires as v0.0.0 becomes its published twin
  grep -E '^\s+k8s\.io/[a-z0-9./-]+ v0\.0\.0$' "$modfile" | awk -v v="$STAGING" '{print "replace " $1 " => " $1 " " v}' | sort -u
} > go.mod
GOFLAGS=-mod=mod go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$VERSION" \
  -o "$BIN.tmp" k8s.io/kubernetes/cmd/kube-apiserver
mv "$BIN.tmp" "$BIN"
echo "$BIN"
