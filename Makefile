# The two set-up commands of the README: `make quickstart` and `make test`. Each builds the
# virtual environment on first use. TORCH picks the PyTorch build: the default is the CPU
# wheel; on a GPU machine use e.g. `make TORCH=torch quickstart`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install quickstart test lint

$(BIN)/embedtune: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[test]"
	touch $@

install: $(BIN)/embedtune

quickstart: install
	HF_HUB_OFFLINE=1 $(BIN)/embedtune train --config quickstart

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest
	$(BIN)/ruff check .

lint: install
	$(BIN)/ruff check .
