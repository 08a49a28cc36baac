# Two entry points for a fresh machine: `make run` (the default job) and `make test`.
# Both create or reuse a virtualenv; torch is installed first so nothing pulls a second build.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; with CUDA: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
RECIPE ?= recipes/default.yaml

.PHONY: setup run test
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
