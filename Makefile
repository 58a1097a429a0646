# Two set-up commands: `make demo` and `make test`. Both create .venv and install.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNELS := $(VENV)/.kernels

.PHONY: install kernels demo test bench results clean

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

# mamba_ssm's and fla's Triton kernels for the interpreter tier (tests/test_kernels_interp.py,
# TRITON_INTERPRET=1 on CPU). --no-deps: they would pull a CUDA torch; FORCE_BUILD skips
# mamba_ssm's setup.py CUDA check, SKIP_CUDA_BUILD its extension (the Mamba1 CUDA scan).
$(KERNELS): $(STAMP)
	$(BIN)/pip install -q triton einops packaging setuptools wheel numpy
	MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE $(BIN)/pip install -q --no-deps --no-build-isolation mamba-ssm==2.3.2.post1
	$(BIN)/pip install -q --no-deps fla-core==0.6.0 flash-linear-attention==0.6.0
	touch $(KERNELS)

kernels: $(KERNELS)

demo: install
	$(BIN)/ttm-bench demo

# the import-layer contract (pyproject.toml [tool.importlinter]) first, then the suite
# (with the Triton interpreter tier: `kernels` installs its packages);
# `$(BIN)/python -m pytest -m "not slow"` is the fast inner loop
test: install kernels
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

# the shipped results: rerun the CPU grids (runs/results, resumable), ship their small files to
# reports/results/<grid>/ and rebuild the findings page reports/results/README.md
results: install
	$(BIN)/ttm-bench results

bench: install
	$(BIN)/ttm-bench bench --quick

clean:
	rm -rf runs/demo .pytest_cache .import_linter_cache
