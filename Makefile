# The two commands of the README: `make serve` (install everything, then serve the demo models) and
# `make test` (install everything, then lint, type-check and run the test suite). Both are idempotent:
# the engine build and the demo models are cached per machine.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
ARGS ?=

CHROMIUM ?= /usr/bin/chromium
APT := $(if $(filter 0,$(shell id -u)),,sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: serve test setup lint browser test-cluster

serve: setup
	$(BIN)/modelyard serve $(ARGS)

# One worker per core (at most 4), each taking whole files: a file's tests share its routers and run in order.
test: setup browser lint
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile

# The optional Ray tier (docs/cluster.md "Tests"): a local Ray cluster with the real engine, in a venv of its
# own so that Ray's pins never change what `make test` runs against; one file after another (each starts a cluster).
RAY_VENV ?= .venv-ray

test-cluster: setup $(RAY_VENV)/.installed
	$(RAY_VENV)/bin/python -m pytest -q tests/test_cluster_ray*.py

lint: $(VENV)/.installed
	$(BIN)/ruff check src tests
	$(BIN)/mypy src

setup: $(VENV)/.installed
	$(BIN)/modelyard engine install
	$(BIN)/modelyard demo install

# The dashboard's browser tests drive Debian's chromium (Playwright's own browser download is not reachable
# everywhere); only `make test` needs it. Installed once; the package lists are fetched only if the first
# attempt finds none.
browser:
	@test -x $(CHROMIUM) || $(APT) install -y -q --no-install-recommends chromium \
		|| { $(APT) update -q && $(APT) install -y -q --no-install-recommends chromium; }

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'
	touch $@

$(RAY_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[ray,test]'
	touch $@
