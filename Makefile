# Set-up and entry points for db-rollback.
#
#   make test         lint, type-check, the whole test suite (PostgreSQL 15 + 18, SeaweedFS)
#                     and the image test
#   make suite        the same without the image test
#   make demo         a bad deploy and its rollback on a throwaway PostgreSQL 18 (scripts/demo.sh)
#   make lint         ruff check, ruff format --check, mypy, lint-imports (layers)
#   make format-check ruff format --check
#   make image-test   build the container image and run it (scripts/image-test.sh)
#   make bench        run the benchmarks in bench/
#   make clean        stop the demo server, remove .demo/ and caches; keeps .cache/ (the
#                     image test's base image) and never touches backups/ or logs/
#   make distclean    make clean, and remove .cache/ too
#
# Works on a fresh Debian machine: creates .venv, installs the package with its dev extras
# (again only when pyproject.toml changes) and Debian's PostgreSQL 15 server, whose binaries
# the tests need. Packages are installed as root, or through sudo when it exists.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-print-directory

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PG15_INITDB := /usr/lib/postgresql/15/bin/initdb
PYTEST_ARGS ?=
# The suite runs in up to 4 worker processes (pytest-xdist), each with its own servers; a
# test module stays on one worker (the kill matrix sums up its own points).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ "$$n" -gt 4 ] && n=4; echo $$n)

# apt-get install $(1), non-interactively; refresh the package lists and retry once when the
# first attempt fails (a fresh machine or container usually has none).
define apt_install
	if [ "$$(id -u)" -eq 0 ]; then sudo=; \
	elif command -v sudo >/dev/null 2>&1; then sudo=sudo; \
	else echo "error: installing $(1) needs root or sudo" >&2; exit 1; fi; \
	apt="$$sudo env DEBIAN_FRONTEND=noninteractive apt-get"; \
	echo "--> apt-get install $(1)"; \
	$$apt install -y --no-install-recommends $(1) \
		|| { $$apt update && $$apt install -y --no-install-recommends $(1); }
endef

.PHONY: help setup test suite lint format-check demo image-test bench clean distclean

help:
	@sed -n '3,14s/^# \{0,1\}//p' Makefile

setup: $(STAMP) $(PG15_INITDB)

# Debian's python3 ships venv without ensurepip; that half lives in python3-venv.
$(BIN)/python:
	@if ! command -v $(PYTHON) >/dev/null 2>&1 \
		|| ! $(PYTHON) -c 'import venv, ensurepip' >/dev/null 2>&1; then \
		$(call apt_install,python3 python3-venv); \
	fi
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --disable-pip-version-check --quiet -e '.[dev]'
	@touch $@

$(PG15_INITDB):
	@$(call apt_install,postgresql)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy rollback_cli
	$(BIN)/lint-imports

format-check: $(STAMP)
	$(BIN)/ruff format --check .

# The image build and the act run come last: they take about five minutes from cold.
test: suite
	bash scripts/image-test.sh

# Everything but the image test (GitHub's CI builds the image with Docker in its own jobs).
suite: lint $(PG15_INITDB)
	$(BIN)/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

demo: $(STAMP)
	scripts/demo.sh

image-test: $(STAMP)
	bash scripts/image-test.sh

# BENCH_SIZE_MB: database size of bench_recovery.py (~100 MB quick; ~750 MB documented);
# BENCH_SIZES=100,750,3000 measures each and the growth. The CLI under test runs from
# .venv-bench: the package with its runtime dependencies only, as users install it.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --disable-pip-version-check --quiet -e .
	@touch $@

bench: $(STAMP) $(PG15_INITDB) $(BENCH_VENV)/.installed
	@shopt -s nullglob; benches=(bench/*.py); \
	if [ $${#benches[@]} -eq 0 ]; then echo "no benchmarks in bench/"; exit 0; fi; \
	for bench in "$${benches[@]}"; do \
		case "$$(basename "$$bench")" in _*|conftest.py) continue ;; esac; \
		echo "== $$bench"; \
		PYTHONPATH=. BENCH_SIZE_MB="$${BENCH_SIZE_MB:-100}" $(BIN)/python "$$bench"; \
	done

clean:
	@if [ -x $(BIN)/python ] && [ -d .demo/pg ]; then \
		$(BIN)/python -m devtools.postgres stop --dir .demo/pg || true; fi
	rm -rf .demo build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache $(BENCH_VENV)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
	@echo "kept .cache/ (the image test's cached base image): make distclean removes it"

distclean: clean
	rm -rf .cache
