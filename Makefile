# MoEyard: `make train` runs the demo job, `make test` runs lint and every test. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A python that already has torch (a GPU machine's CUDA build) lends it to the venv, so no other torch is
# fetched. Otherwise CPU machines pin the CPU torch build: an unpinned torch would pull a multi-GB CUDA build.
# (Only a python that is not itself a venv: a venv's packages do not reach another venv's system site.)
BASE_TORCH := $(shell $(PY) -c "import importlib.metadata as m, sys; sys.prefix == sys.base_prefix and print(m.version('torch'))" 2>/dev/null)
VENV_FLAGS := $(if $(BASE_TORCH),--system-site-packages)
CONSTRAINTS := $(if $(BASE_TORCH)$(shell command -v nvidia-smi 2>/dev/null),,constraints-cpu.txt)
PIP := $(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_BUILD_OPS := 0

.PHONY: train test test-oldest test-gpu lint setup setup-dev system-deps clean

# The venv's own pip (no upgrade: that would need an index, and Python 3.11's pip installs this project).
$(BIN)/python:
	$(PY) -m venv $(VENV_FLAGS) $(VENV)
	$(if $(BASE_TORCH),@echo "setup: using the torch $(BASE_TORCH) of $(PY) (venv with --system-site-packages)")

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

# The version-sensitive unit tests and the pipeline, bf16 and FSDP layouts under the oldest supported torch (a cached venv).
test-oldest:
	@PY=$(PY) bash .ci/oldest-torch.sh $(ARGS)

# The tests marked gpu alone, with the GPUs visible (every other test hides them).
test-gpu: setup-dev
	$(BIN)/pytest -q -m gpu $(ARGS)

clean:
	rm -rf $(VENV) .cache runs
