# The two commands: `make run` brings the whole system up on this machine; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test install bench clean test-postgres

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m starter.devstack

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The same suite against PostgreSQL (ATELIER_TEST_DATABASE_URL must point at a database you may wipe).
test-postgres: $(STAMP)
	ATELIER_TEST_DATABASE_URL=$${ATELIER_TEST_DATABASE_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/atelier_test} \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.run_all

clean:
	rm -rf var .pytest_cache
