# Podvisor: `make run` and `make test` do all set-up on a fresh Debian 12 host.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMPS := .stamps
PYTEST_ARGS ?=

.PHONY: run test test-deps unit integration fuzz check-wire lint bench setup deps host proto clean guest demo demo-stop

include images/tiny/Makefile.inc
include images/debian/Makefile.inc

setup: deps $(STAMPS)/venv proto host

deps:
	@scripts/install-deps.sh

# What only the tests need on top (the Go SPDY interop client's toolchain).
test-deps:
	@scripts/install-deps.sh --test

$(STAMPS)/venv: pyproject.toml
	@mkdir -p $(STAMPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

proto: $(STAMPS)/venv
	$(PY) scripts/gen_proto.py

host:
	@scripts/host-up.sh

run: setup
	exec $(VENV)/bin/podvisor-agent

# A first VM in one command (agent/cli/demo.py): throwaway registry, push,
# apply examples/testvm.yaml, console until ready. Starts an agent of its own
# (state in $$PODVISOR_DEMO_DIR, default /var/lib/podvisor-demo) when none
# answers on $$PODVISOR_SOCKET (/run/podvisor/podvisor.sock); `make demo-stop`
# deletes the VM and stops that agent. DEMO_ARGS: e.g. --cleanup.
demo: setup guest
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m agent.cli.main demo $(DEMO_ARGS)

demo-stop:
	$(PY) -m agent.cli.main demo --stop

# proto/runtime/v1/api.proto against upstream's wire facts in proto/runtime/v1/wire.json.
check-wire: $(STAMPS)/venv
	$(PY) scripts/check_wire.py

# The tiny test guest (cached per machine); refreshes apt lists once if a
# package moved since they were fetched.
guest:
	@images/tiny/build.sh $(TINY_IMAGE_DIR) || (apt-get update -q && images/tiny/build.sh $(TINY_IMAGE_DIR))

# The stock Debian 12 guest (images/debian/Makefile.inc: debian-image, cached
# per machine; a few minutes the first time) is only for the e2e tests.
# --require-integration: an integration or e2e test that would skip fails (tests/conftest.py).
test: setup test-deps check-wire lint guest debian-image
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest --require-integration $(PYTEST_ARGS) tests

unit: setup test-deps
	$(PY) -m pytest -m "not integration and not e2e" $(PYTEST_ARGS) tests

integration: setup test-deps guest debian-image
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -m "integration or e2e" --require-integration $(PYTEST_ARGS) tests

# The fuzz tests with a long budget (hypothesis profile "fuzz"); `make test`
# runs the same tests with the small "ci" budget (tests/fuzz/conftest.py).
fuzz: setup test-deps
	HYPOTHESIS_PROFILE=fuzz PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest --require-integration $(PYTEST_ARGS) tests/fuzz

# Style, strict types, and the import contracts of pyproject.toml's [tool.importlinter].
lint: $(STAMPS)/venv proto
	$(VENV)/bin/ruff check agent tests bench scripts setup.py
	$(VENV)/bin/mypy agent scripts setup.py
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports

bench: setup test-deps guest debian-image
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/rpc.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/tls.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/pull.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/start.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/network.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/lifecycle.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/exec.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/volumes.py
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/soak.py --cycles 500

clean:
	rm -rf $(VENV) $(STAMPS) agent/api/gen
