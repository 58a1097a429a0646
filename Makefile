# Two set-up commands: `make demo` and `make test`. Both create .venv and install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# A pre-installed torch (e.g. a CUDA build) is kept; otherwise the CPU wheel torch==2.13.0.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps "tinysoundfont>=0.3.7"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/ttm-bench demo

# the import-layer contract (pyproject.toml [tool.importlinter]) first, then the suite;
# `$(BIN)/python -m pytest -m "not slow"` is the fast inner loop
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

bench: install
	$(BIN)/ttm-bench bench --quick

clean:
	rm -rf runs/demo .pytest_cache .import_linter_cache
