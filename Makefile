# eglp_dist — one entry point for setup, demo, tests and benchmarks.
# `make setup` works on a fresh machine with no manual step; see README "Setup" for what it
# does differently on a machine with CUDA.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIP_FLAGS ?= --disable-pip-version-check
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),torch==2.13.0,torch==2.13.0+cpu)

.PHONY: setup demo test test-all bench gpu-check gpu-kit lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements/constraints.txt requirements/runtime.txt requirements/dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(PIP_FLAGS) -q "setuptools==84.2.1" "wheel==0.48.0"
	# torch first. Without a GPU only the +cpu build is acceptable (never the CUDA build and
	# its nvidia-* packages); the PyTorch CPU index is a fallback where no local wheel exists.
	$(PIP) install $(PIP_FLAGS) -q "$(TORCH_SPEC)" \
	  || $(PIP) install $(PIP_FLAGS) -q "$(TORCH_SPEC)" --extra-index-url https://download.pytorch.org/whl/cpu
	$(PIP) install $(PIP_FLAGS) -q -c requirements/constraints.txt -r requirements/runtime.txt -r requirements/dev.txt
	# deepspeed ships as an sdist whose setup.py imports torch: build it against ours.
	DS_BUILD_OPS=0 $(PIP) install $(PIP_FLAGS) -q --no-build-isolation -c requirements/constraints.txt "deepspeed==0.19.8"
	$(PIP) install $(PIP_FLAGS) -q --no-build-isolation --no-deps -e .
	$(PY) -W ignore::RuntimeWarning -m eglp_dist.compat
	touch $@

demo: setup
	$(RUN) $(PY) -m eglp_dist demo

# .venv/bin first on PATH: DeepSpeed JIT-builds a small CPU op with the venv's ninja.
RUN := PATH=$(abspath $(VENV))/bin:$$PATH

test: setup
	$(RUN) $(PY) -m pytest -q

test-all: setup
	$(RUN) $(PY) -m pytest -q -m "slow or not slow"

# pyflakes-class mistakes and pycodestyle's errors (pyproject.toml [tool.ruff]); CI runs it
lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(RUN) $(PY) tools/bench_engine.py --ranks 2 --json runs/bench/engine.json
	$(RUN) $(PY) tools/bench_loader.py --json runs/bench/loader.json
	$(RUN) $(PY) tools/bench_step.py --ranks 2 --memory --count-collectives --json runs/bench/step.json

# The GPU path proven and measured (tools/gpu_check.py): on a GPU machine at paper size, in
# under 5 minutes; elsewhere a tiny dry run of the same code paths that says what it skipped.
gpu-check: setup
	$(RUN) $(PY) tools/gpu_check.py --out runs/gpu_check

# The wheels a bare GPU host needs (CPython 3.12, torch preinstalled, no registry) to run the
# GPU check: build/gpu-kit/ here, then tools/gpu_run.sh there (docs/engine.md).
gpu-kit: setup
	$(RUN) $(PY) tools/gpu_kit.py --out build/gpu-kit

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
