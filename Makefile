# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is installed alone first so that pip takes the CPU wheel of this exact release.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

.PHONY: install demo test lint
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/unicon simulate

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q -ra
