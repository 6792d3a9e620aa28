#!/usr/bin/env bash
# The unit tests that can differ between torch versions, and the multi-process tests of pipeline
# parallelism, bf16 and FSDP, under the oldest torch MoEyard supports (pyproject.toml's lower bound), in a
# venv cached under .cache/ and reused while it holds that torch. The first run installs PyPI's build of that torch with its CUDA libraries (about 2 minutes and
# 4.8 GB; it runs on a CPU-only machine); later runs reinstall only MoEyard's own dependencies, when
# pyproject.toml changed. Arguments go to pytest. Usage: make test-oldest [ARGS=...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
oldest=$(sed -n 's/^ *"torch>=\([0-9][0-9.]*\)".*/\1/p' pyproject.toml)
[ -n "$oldest" ] || { echo "test-oldest: pyproject.toml states no torch>= lower bound" >&2; exit 2; }
venv=.cache/venv-torch$oldest

has_oldest() {  # whether python $1 imports torch $oldest.x
  "$1" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0].rsplit('.', 1)[0] != '$oldest')" 2>/dev/null
}

if [ -x .venv/bin/python ] && has_oldest .venv/bin/python; then
  echo "test-oldest: .venv already runs torch $oldest (make test covered it); nothing more to run"
  exit 0
fi
if ! has_oldest "$venv/bin/python"; then
  echo "test-oldest: installing torch $oldest into $venv (PyPI's build: about 2 minutes and 4.8 GB)"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$oldest.*"
fi
# The test suite's needs without the peer libraries (DeepSpeed, Megatron): their tests do not run here. The
# build backend too: the packaging test builds the wheel without isolation, and a venv's own setuptools is older.
stamp="$venv/.deps-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -e "$stamp" ]; then
  build=$(sed -n 's/^requires = \["\(setuptools[^"]*\)"\]/\1/p' pyproject.toml)
  "$venv/bin/pip" install -q -e . "$build" pytest pytest-timeout transformers tensorboard
  touch "$stamp"
fi
"$venv/bin/python" -c "import torch; print('test-oldest: torch', torch.__version__)"
# The unit tests whose outcome can depend on torch's version: its APIs (compat, pipelining, DCP, compile,
# grouped_mm, SDPA, profiler, FakeTensor/dispatch modes) rather than pure Python (config, planner, docs).
unit=(compat gpu_path compile moe_layer router attention attention_flex model train checkpoint checkpoint_scale
  checksums startup_alloc document_mask profiling upcycle hf_families run_dir plan_state gpu_trainer muon
  static_dispatch context expert_backward flops combine_precision)
"$venv/bin/pytest" -q $(printf "tests/unit/test_%s.py " "${unit[@]}") "$@"
# Pipeline, bf16, FSDP and ZeRO layouts against one process (not the 8-rank tp2-pp2-ep2-dp2: time), a pipeline
# checkpoint loaded under another layout, and Muon's uneven all-to-all of experts whose rows FSDP splits.
"$venv/bin/pytest" -q tests/multiproc/test_golden.py tests/multiproc/test_reshard.py tests/multiproc/test_golden_zero.py \
  tests/multiproc/test_golden_muon.py \
  -k "(test_layout_trains_like_one_process and (pp2 or bf16 or fsdp) and not tp2-pp2) or (test_reshard and pp2) or zero or one-expert" "$@"
