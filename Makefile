# MoEyard: `make train` runs the demo job, `make test` runs lint and every test. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU machines pin the CPU torch build; an unpinned torch would pull a multi-GB CUDA build.
CONSTRAINTS := $(if $(shell command -v nvidia-smi 2>/dev/null),,constraints-cpu.txt)
PIP := $(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0

.PHONY: train test lint setup setup-dev system-deps clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.core: $(BIN)/python pyproject.toml constraints-cpu.txt
	$(PIP) -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) -e '.[dev]'
	touch $@

setup: $(VENV)/.core
setup-dev: $(VENV)/.dev system-deps

# Debian packages the tests drive for real: Slurm (with munge) and Chromium. Needs root; skipped if present.
system-deps:
	@bash .ci/system-deps.sh

train: setup
	$(BIN)/moeyard train experiment=cpu_demo $(ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup-dev lint
	$(BIN)/pytest -q $(ARGS)

clean:
	rm -rf $(VENV) .cache runs
