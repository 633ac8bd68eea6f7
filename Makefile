# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA driver, ask for the CPU build of torch so pip does not pull
# multi-GB CUDA wheels; override with `make TORCH=... test`.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)

# The compile guard also runs against triton 3.6 (what the GPU machines we benchmark on run), in its own venv:
# torch as above, then triton 3.6.0 without dependencies (the guard needs only its compiler and ptxas).
TRITON36_VENV ?= .venv-triton36
TRITON36 ?= triton==3.6.0

.PHONY: demo test venv clean test-compile-triton36

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

$(TRITON36_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(TRITON36_VENV)
	$(TRITON36_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON36_VENV)/bin/python -m pip install -q "$(TORCH)" numpy tqdm pytest pytest-benchmark
	$(TRITON36_VENV)/bin/python -m pip install -q --no-deps "$(TRITON36)"
	$(TRITON36_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

test-compile-triton36: $(TRITON36_VENV)/.installed
	$(TRITON36_VENV)/bin/python -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
	$(TRITON36_VENV)/bin/python -m pytest -q tests/test_kernels_compile.py

demo: venv
	$(PY) -m fastdpo bench

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(TRITON36_VENV) build dist *.egg-info
