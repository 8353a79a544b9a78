# Thin wrappers around scripts/install.sh and the venv's tools.
VENV ?= .venv
PY := $(VENV)/bin/python
RUFF := $(VENV)/bin/ruff
PYTEST_ARGS ?=
# Only the source directories that exist.
SRC_DIRS := $(wildcard lightning_gfm tests examples benchmarks)

export GFM_VENV := $(VENV)

.PHONY: install install-dev test demo lint format docs

install:
	bash scripts/install.sh

install-dev:
	bash scripts/install.sh dev

test: install-dev
	$(RUFF) check $(SRC_DIRS)
	$(RUFF) format --check $(SRC_DIRS)
	$(PY) -m pytest $(PYTEST_ARGS)

demo:
	bash scripts/install.sh examples
	$(PY) examples/demo.py

# The documentation site (Sphinx + MyST); every warning is an error. Output: docs/_build/html.
docs: install-dev
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

lint:
	$(RUFF) check $(SRC_DIRS)
	$(RUFF) format --check $(SRC_DIRS)

format:
	$(RUFF) format $(SRC_DIRS)
	$(RUFF) check --fix $(SRC_DIRS)
