# Two entry points for a fresh machine: `make run` (the default job) and `make test`.
# Both create or reuse a virtualenv; torch is installed first so nothing pulls a second build.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; with CUDA: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
RECIPE ?= recipes/default.yaml

.PHONY: setup run test peers-venv
setup: $(VENV)/.calq-installed

$(VENV)/.calq-installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(VENV)/bin/calq run $(RECIPE)

test: setup
	$(PY) -m pytest -q --durations=10

# The peers (benchmarks/bench_peers.py) pin other packages, so they get a virtualenv of their own.
peers-venv: .venv-peers/.installed

.venv-peers/.installed: pyproject.toml
	test -x .venv-peers/bin/python || python3 -m venv .venv-peers
	.venv-peers/bin/pip install -q $(TORCH)
	.venv-peers/bin/pip install -q -e . llmcompressor==0.14.0.1 autoawq==0.2.9 transformers==5.17.0 $(TORCH)
	touch $@
