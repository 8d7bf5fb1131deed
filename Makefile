# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv first.
VENV  ?= .venv
PY    := $(VENV)/bin/python
TUNE  := $(VENV)/bin/tune
STAMP := $(VENV)/.installed
# The CPU build on this kind of machine; GPU users may set TORCH="torch" to get their CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo lint clean-demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check tune recipes tests
	$(VENV)/bin/ruff format --check tune recipes tests

demo: $(STAMP)
	$(PY) scripts/demo.py
