# The two set-up commands of the README: `make up` (install and run the pool) and `make test` (install and test).
# Both are idempotent: they install what is missing and skip what is there.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT_RUN  := python3 python3-venv python3-dev build-essential iproute2 postgresql redis-server wireguard-tools wireguard-go nftables sqlite3
APT_TEST := $(APT_RUN) chromium wrk iptables docker.io debootstrap systemd
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# a recipe piped through tee fails when pytest does
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec

.PHONY: up test lint system-run system-test venv venv-test bench clean

up: system-run venv
	$(VENV)/bin/rma up $${RMA_NODE_IP:+--node-ip-address $$RMA_NODE_IP}

# `make test`: the install, the lint, then scripts/run-tests.sh: the unit tests in random order (pytest-randomly;
# the seed is printed) and the tests that start no cluster run in a background lane while the heavy tests (Ray,
# netns beds, dockerd, Chromium, the LLM) run in the foreground, with RMA_TEST_REQUIRE set to all this machine can
# run (tests/support/capabilities.py), so a test that cannot run here fails instead of skipping quietly; set
# RMA_TEST_REQUIRE yourself to narrow or widen it. Each lane writes JUnit XML, its output (with the 25 slowest) and
# per-capability counts under artifacts/test/. A run that hangs is interrupted at TEST_SESSION_LIMIT: pytest prints
# the test it was in, and the run fails. After the run, the claims of SECURITY.md, docs/architecture.md and the
# README (tests/claims.toml) are reported against the JUnit files, even when pytest failed (its status is kept): a
# claim whose named test failed or vanished fails the target too. The script says why two lanes and not more.
# PYTHONNODEBUGRANGES (set by the script): tracebacks without column carets. CPython 3.11 finds the carets by
# parsing the failing line (`ast.parse`), and its parser keeps one recursion counter per interpreter: a traceback
# formatted by a finalizer (an asyncio task's unread exception, logged when it is collected) in the middle of
# another `ast.parse` (pytest's assertion rewriting of a module imported late) breaks that parse with "AST
# constructor recursion depth mismatch" (seen twice in random unit orders).
TEST_SESSION_LIMIT ?= 80m

test: system-test venv-test lint
	PY=$(PY) TEST_SESSION_LIMIT=$(TEST_SESSION_LIMIT) scripts/run-tests.sh

# the lint and type check `make test` runs first ([tool.ruff] and [tool.mypy] in pyproject.toml)
lint: venv-test
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	$(PY) -m mypy rma_ray admission

system-run:
	@./scripts/apt-ensure.sh $(APT_RUN)

system-test:
	@./scripts/apt-ensure.sh $(APT_TEST)

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	touch $@

venv: $(VENV)/.created
	$(PY) -m pip install -q -e '.[stores,services,overlay]'
	./scripts/install-llm.sh $(PY)

venv-test: $(VENV)/.created
	$(PY) -m pip install -q -e '.[test,stores,services,overlay]'
	./scripts/install-llm.sh $(PY)

bench: system-test venv-test
	$(PY) -m bench.admission_heartbeats

clean:
	rm -rf $(VENV) artifacts .pytest_cache
