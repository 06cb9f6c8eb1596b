# The two commands a fresh Debian machine needs (as root): `make demo` and `make test`.
PYTHON ?= python3

.PHONY: setup demo test test-deps unit fleet lint
setup:
	scripts/setup-host

demo: setup
	scripts/demo

test: setup test-deps
	$(PYTHON) -m pytest -q -rs tests

# What only the tests use: nginx (a real multi-process server to migrate), Debian's python3,
# tcpdump (to show page traffic never crosses in clear), the container runtimes and a static
# busybox to build their containers offline, iptables (tests read CRIU's network-lock rules).
TEST_PACKAGES = nginx-light python3 tcpdump runc lxc podman busybox-static iptables
test-deps:
	@dpkg -s $(TEST_PACKAGES) >/dev/null 2>&1 || \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    $(TEST_PACKAGES) >/dev/null

# Unit tests (no root, no network) with coverage of the orchestrator package, per file.
unit:
	$(PYTHON) -m pytest -q tests/unit --cov=orchestrator --cov-report=term-missing:skip-covered

# Fleet mode alone (a Temporal dev server and the lab; `make test` runs these too).
fleet: setup
	$(PYTHON) -m pytest -q -rs tests/fleet

lint:
	ruff check . && ruff format --check . && mypy orchestrator
