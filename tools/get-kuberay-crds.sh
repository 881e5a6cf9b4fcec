#!/usr/bin/env bash
# KubeRay's CRDs (RayJob, RayCluster) from the github.com/ray-project/kuberay/ray-operator
# Go module: `go mod download` through the Go module proxy (no release download, no
# Docker), then copy config/crd/bases/ray.io_{rayjobs,rayclusters}.yaml into
# ~/.cache/lethe/kuberay-VERSION/. Cached: later runs only check that the files exist.
# Prints the directory on the last line of stdout.
set -euo pipefail
VERSION="${KUBERAY_VERSION:-v1.4.2}"
CACHE="${LETHE_CACHE:-$HOME/.cache/lethe}"
DIR="$CACHE/kuberay-$VERSION"
CRDS=(ray.io_rayjobs.yaml ray.io_rayclusters.yaml)
done_already=1
for f in "${CRDS[@]}"; do [ -s "$DIR/$f" ] || done_already=0; done
if [ "$done_already" = 1 ]; then echo "$DIR"; exit 0; fi
command -v go >/dev/null || { echo "go is needed to fetch KubeRay's CRDs" >&2; exit 1; }
# A module cache of our own (writable, so `rm -rf ~/.cache/lethe` works).
export GOMODCACHE="$CACHE/gomod" GOFLAGS="-modcacherw" GO111MODULE=on
mkdir -p "$CACHE"
cd "$CACHE"  # outside any go.mod: a plain module download
src=$(go mod download -json "github.com/ray-project/kuberay/ray-operator@$VERSION" \
  | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
[ -n "$src" ] || { echo "go mod download gave no directory for ray-operator@$VERSION" >&2; exit 1; }
mkdir -p "$DIR.tmp"
for f in "${CRDS[@]}"; do install -m 0644 "$src/config/crd/bases/$f" "$DIR.tmp/$f"; done
rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
echo "$DIR"
