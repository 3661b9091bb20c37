# Two entry points that work on a fresh machine: `make main` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup main test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, pinned to the release this machine carries as a CPU wheel; the package's own range (torch>=2.4)
# is then already satisfied, so pip does not pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

main: setup
	$(BIN)/python scripts/main_job.py $(ARGS)

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests

lint: setup
	$(BIN)/ruff check src tests scripts experiments
