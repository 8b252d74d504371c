# LLM Gateway — everyday commands. Everything runs from a local virtualenv (.venv).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: run test lint bench install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'

## make run: the whole product in one process (mock LLM :8002, control plane :8000, edge :8001)
run: install
	$(BIN)/llm-gateway dev

## make test: lint, types and the whole suite against real servers, PostgreSQL and Redis
test: install-test lint
	$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install-test
	@echo "no benchmarks yet"

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
