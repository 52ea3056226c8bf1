# Two commands do all set-up on a fresh machine:
#   make test   - create .venv, install everything, run the test suite
#   make demo   - same install, then the main job (a small SoLoPO run on CPU)
# Variables: VENV (default .venv), PYTHON (interpreter that creates the venv),
#            TORCH_SPEC (torch to install where no CUDA torch is present), PYTEST_ARGS.
# Also: make test-fast (unit tests), make test-slow, make lint, make clean.
# make gpu-check: the one-shot GPU check (tools/gpu_check.py; no venv, no network: WHEELS=DIR).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# for the CPU build from the public index (PyPI's default Linux wheel is the CUDA one).
TORCH_PIP_ARGS ?=
MCORE_SPEC ?= megatron-core==0.19.2
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-slow lint demo clean gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	@$(PYTHON) -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)" || { \
	    echo "error: $(PYTHON) is Python $$($(PYTHON) -c 'import platform; print(platform.python_version())'); megatron-core 0.19 needs >= 3.11 (make PYTHON=python3.11 ...)"; exit 2; }
	@# Inside an NGC PyTorch container the system torch is a CUDA build with Transformer Engine:
	@# reuse it (system site packages) instead of installing another torch.
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	    echo "[install] CUDA torch found in $(PYTHON): venv reuses system site packages"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    $(PYTHON) -m venv $(VENV); \
	fi
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	    echo "[install] no torch: installing $(TORCH_SPEC) $(TORCH_PIP_ARGS)"; \
	    $(PIP) install -q "$(TORCH_SPEC)" $(TORCH_PIP_ARGS); \
	fi
	@# megatron-core 0.19.x declares Requires-Python>=3.12 but ships a cp311 wheel; numpy 2.5
	@# has no cp311 wheel, hence the pin on 3.11.
	@if $(PY) -c "import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)"; then \
	    $(PIP) install -q "$(MCORE_SPEC)"; \
	else \
	    $(PIP) install -q --ignore-requires-python "$(MCORE_SPEC)" "numpy<2.5" "packaging>=24.2"; \
	fi
	$(PIP) install -q -e ".[dev,hf]"
	@touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit tests only (seconds).
test-fast: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow --run-slow $(PYTEST_ARGS)

# pyflakes-level checks (unused/undefined names, syntax): see [tool.ruff] in pyproject.toml.
lint: install
	$(PY) -m ruff check megatron_solopo tools tests benchmarks experiments

demo: install
	$(PY) -m megatron_solopo.demo

# One command on a GPU machine (<= 8 min on one H100/H200): tests/gpu, the trainer on CUDA,
# bench_step at 8K/16K/32K (1B model), FP8 with Transformer Engine, a max-length search. Uses the
# machine's own Python (torch with CUDA); what is missing comes from the wheel files in WHEELS.
GPU_PYTHON ?= python3
WHEELS ?=
GPU_CHECK_JSON ?= gpu_check.json
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py $(if $(WHEELS),--wheels $(WHEELS)) --output $(GPU_CHECK_JSON) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
