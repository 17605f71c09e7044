# The two commands README starts with. Each creates .venv on first use (scripts/install.sh).
PYTHON ?= python3.11
VENV ?= .venv
export PYTHON VENV

.PHONY: install demo test lint

install:
	bash scripts/install.sh

# Local Ray + the service + the quickstart job end to end, then a query of the trained policy.
demo: install
	bash scripts/demo.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Hygiene checks, the servers the tests start (PostgreSQL), then the whole suite. pytest's exit 5 (no tests
# collected) fails like any other error.
test: lint
	bash scripts/test-services.sh
	$(VENV)/bin/python -m pytest -q --timeout=900 --durations=30
