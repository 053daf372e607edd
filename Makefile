# The two set-up commands of the README: `make up` (install and run the pool) and `make test` (install and test).
# Both are idempotent: they install what is missing and skip what is there.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT_RUN  := python3 python3-venv python3-dev build-essential iproute2 postgresql redis-server wireguard-tools wireguard-go nftables sqlite3
APT_TEST := $(APT_RUN) chromium wrk iptables docker.io debootstrap systemd
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: up test system-run system-test venv venv-test bench clean

up: system-run venv
	$(VENV)/bin/rma up $${RMA_NODE_IP:+--node-ip-address $$RMA_NODE_IP}

test: system-test venv-test
	$(PY) -m pytest -q

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
