# The README's commands. Everything a newcomer needs is installed by these targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.headwater-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench lint setup system clean down

setup: $(STAMP) system

$(STAMP): pyproject.toml setup.py detection/_fastparse.c detection/_fastedges.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,content,s3]'
	touch $(STAMP)

# Debian packages the tests use: redis-server, kcat, auditd, docker-compose, chromium.
system:
	bash scripts/install-system.sh

demo: setup
	bash scripts/demo.sh

# The whole suite runs on two pytest-xdist workers, a test file at a time (--dist loadfile:
# a module's fixtures, e.g. a stack it starts once, are set up on one worker only). Each
# worker has its own session broker and Redis; every stack a test starts has its own ports,
# topics and state directory, and the audit tests' recorder is scoped to its own audit uid,
# so two files never see each other's processes or data. Exit code 5 (nothing selected,
# e.g. PYTEST_ARGS="-k ..." matching no test) is not a failure.
UNIT := not integration and not faults and not audit and not browser

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "$(UNIT)" $(PYTEST_ARGS)

bench: setup
	bash scripts/bench.sh

lint: $(STAMP)
	$(BIN)/ruff check core headwater streams features learner detection serving tests bench

down:
	$(BIN)/headwater down || true

clean: down
	rm -rf .headwater artifacts
