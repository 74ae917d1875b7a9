# The README's commands. Needs only Python (3.11+) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= deploy/demo.yaml

.PHONY: run test lint typecheck check install clean

$(BIN)/sidecar: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/sidecar

## make run: install, migrate the embedded SQLite database, create the demo IdP key and a
## signing key, apply the demo policies, and serve on 127.0.0.1:8080.
run: install
	$(BIN)/sidecar demo-init
	$(BIN)/sidecar --config $(CONFIG) db upgrade
	$(BIN)/sidecar --config $(CONFIG) policy apply $(CONFIG)
	$(BIN)/sidecar --config $(CONFIG) serve

## make test: the whole suite.
test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check sidecar tests migrations
	$(BIN)/ruff format --check sidecar tests migrations

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
