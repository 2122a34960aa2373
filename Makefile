# The README's commands. Everything a newcomer needs is installed by these targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.headwater-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench lint setup system clean down

setup: $(STAMP) system

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,content,s3]'
	touch $(STAMP)

# Debian packages the tests use: redis-server, kcat, auditd, docker-compose, chromium.
system:
	bash scripts/install-system.sh

demo: setup
	bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration and not faults and not audit and not browser" $(PYTEST_ARGS)

bench: setup
	bash scripts/bench.sh

lint: $(STAMP)
	$(BIN)/ruff check core headwater streams features learner detection serving tests bench

down:
	$(BIN)/headwater down || true

clean: down
	rm -rf .headwater artifacts
