# Two commands for a newcomer:  `make run` (start the app)  and  `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: run test install install-dev lint services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e ".[postgres]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e ".[postgres,dev,local-embeddings]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

## run: create the virtual environment, install, and start the dashboard on port 5006
run: $(VENV)/.installed
	$(BIN)/study-query-llm-dashboard    # PANEL_PORT / PANEL_ADDRESS from the environment or .env

## test: install what the tests need (packages, services) and run the whole suite
test: $(VENV)/.installed-dev services
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

## services: make sure the local PostgreSQL the integration tests use is up
services:
	bash scripts/test_services.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
