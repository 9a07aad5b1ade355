# The two commands of the README: `make serve` (install everything, then serve the demo models) and
# `make test` (install everything, then lint, type-check and run the test suite). Both are idempotent:
# the engine build and the demo models are cached per machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ARGS ?=

.PHONY: serve test setup lint

serve: setup
	$(BIN)/modelyard serve $(ARGS)

test: setup lint
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

setup: $(VENV)/.installed
	$(BIN)/modelyard engine install
	$(BIN)/modelyard demo install

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@
