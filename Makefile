# The README's commands. Needs only Python (3.11+) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= deploy/demo.yaml

.PHONY: run demo test lint typecheck check install tools clean bench

$(BIN)/sidecar: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/sidecar

## Offline checkers of deploy/ (kubernetes-validate, checkov), in a virtual environment of
## their own so that their pins never touch the project's.
TOOLS := .venv-tools
$(TOOLS)/bin/checkov:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --upgrade pip
	$(TOOLS)/bin/pip install --quiet 'kubernetes-validate>=1.30' 'checkov>=3.2'
	touch $@

tools: $(TOOLS)/bin/checkov

## make run: install, migrate the embedded SQLite database, create the demo IdP key and a
## signing key, and serve on 127.0.0.1:8080; serve applies the demo policies to an empty policy
## table only, so the changes a user made (the README's policy tour) survive the next make run.
run: install
	$(BIN)/sidecar demo-init
	$(BIN)/sidecar --config $(CONFIG) db upgrade
	$(BIN)/sidecar --config $(CONFIG) serve

## make demo: the whole idea in one command, on loopback: a demo IdP, the sidecar, a gateway
## and two upstreams (sidecar/walkthrough/); every process it starts is stopped at the end.
demo: install
	$(BIN)/sidecar demo

## make test: the whole suite.
## Two workers (pytest-xdist): the functional tests that start servers run one after the other
## on one of them (tests/conftest.py), the unit and HTTP tests on the other.
test: install tools
	$(BIN)/pytest -n 2 --dist loadgroup

## make bench: the service against a bare baseline app under the same load (bench/run.py):
## requests/s, p50/p99/p99.9, errors, peak RSS per worker. wrk (Debian's package) is installed
## when missing and apt-get can run without asking; otherwise the Python load generator is used.
## BENCH_ARGS passes options, e.g. make bench BENCH_ARGS="--duration 5 --json bench.json".
BENCH_ARGS ?=
bench: install
	@command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else sudo=none; fi; \
	  if [ "$$sudo" != none ] && command -v apt-get >/dev/null 2>&1 && \
	     $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null >/dev/null 2>&1 && \
	     $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	       wrk </dev/null >/dev/null 2>&1; then echo "bench: installed wrk"; \
	  else echo "bench: wrk not installed (no non-interactive apt-get); using the Python load generator"; fi; }
	$(BIN)/python -m bench.run $(BENCH_ARGS)

lint: install
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/ruff format --check sidecar tests bench

typecheck: install
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) $(TOOLS) var .pytest_cache .mypy_cache .ruff_cache
