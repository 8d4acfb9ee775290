# The two set-up commands of the README:
#   make run   – create .venv, install pinned dependencies, run the quickstart study
#                (experiments/quickstart.yaml; tables, figures and report under results/quickstart/)
#   make test  – same install, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tests and studies read datasets from PRUNELAB_DATA; use ../shared/data when it is there.
export PRUNELAB_DATA ?= $(abspath $(wildcard ../shared/data))

.PHONY: run test lint install bench clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/prunelab run experiments/quickstart.yaml --report

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Lint, format check and type check (configured in pyproject.toml); .ci/run runs it before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/mask_overhead.py
	$(BIN)/python benchmarks/harness_overhead.py

clean:
	rm -rf $(VENV) results .pytest_cache
