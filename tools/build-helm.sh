#!/usr/bin/env bash
# Build helm from the helm.sh/helm/v3 Go module (no release download): a throwaway
# module requires it and `go build`s cmd/helm with the ldflags of helm's own Makefile.
# Same caches as tools/build-kube-apiserver.sh (the default GOPATH/GOCACHE, binaries
# under ~/.cache/lethe/bin), so later runs are instant. Prints the path of the binary.
set -euo pipefail
VERSION="${HELM_VERSION:-v3.21.4}"
CACHE="${LETHE_CACHE:-$HOME/.cache/lethe}"
BIN="$CACHE/bin/helm-$VERSION"
if [ -x "$BIN" ]; then echo "$BIN"; exit 0; fi
command -v go >/dev/null || { echo "go is needed to build helm" >&2; exit 1; }
WORK="$CACHE/build/helm-$VERSION"
mkdir -p "$WORK" "$CACHE/bin"
cd "$WORK"
cat > go.mod <<EOF
module lethe.dev/helm-build

go 1.26

require helm.sh/helm/v3 $VERSION
EOF
export GOFLAGS=-mod=mod  # helm's own requirements (and go.sum) are filled in as needed
# `helm lint` and `helm template` default to the Kubernetes version of client-go, +1 major
# (as helm's Makefile does: v0.35 -> 1.35)
kv=$(go list -m -f '{{.Version}}' k8s.io/client-go)
kv=${kv#v0.}
major=1
minor=${kv%%.*}
pkg=helm.sh/helm/v3
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w \
  -X $pkg/internal/version.version=$VERSION \
  -X $pkg/internal/version.gitTreeState=clean \
  -X $pkg/pkg/lint/rules.k8sVersionMajor=$major -X $pkg/pkg/lint/rules.k8sVersionMinor=$minor \
  -X $pkg/pkg/chartutil.k8sVersionMajor=$major -X $pkg/pkg/chartutil.k8sVersionMinor=$minor" \
  -o "$BIN.tmp" "$pkg/cmd/helm"
mv "$BIN.tmp" "$BIN"
echo "$BIN"
