# Two commands on a fresh machine: `make serve` and `make test`.
# Each target creates the virtual environment it needs when missing.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: serve test lint bench bench-service soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,ray]'
	touch $@ $(VENV)/.installed-runtime

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,ray,bench]'
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-runtime

serve: $(VENV)/.installed-runtime
	$(BIN)/unfold serve

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check solvers service tests bench examples
	$(BIN)/ruff format --check solvers service tests bench examples

bench: $(VENV)/.installed-bench
	$(BIN)/python bench/solvers.py

bench-service: $(VENV)/.installed-bench
	$(BIN)/python bench/service.py

# A bounded soak of a real server on 127.0.0.1 (not a pytest test): SOAK_SECONDS=120 by default.
SOAK_SECONDS ?= 120
soak: $(VENV)/.installed-test
	$(BIN)/python bench/soak.py --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
