# The two commands a fresh Debian machine needs (as root): `make demo` and `make test`.
PYTHON ?= python3

.PHONY: setup demo test unit lint
setup:
	scripts/setup-host

demo: setup
	scripts/demo

test: setup
	$(PYTHON) -m pytest -q -rs tests

unit:
	$(PYTHON) -m pytest -q tests/unit

lint:
	ruff check . && ruff format --check . && mypy orchestrator
