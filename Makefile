# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA driver, ask for the CPU build of torch so pip does not pull
# multi-GB CUDA wheels; override with `make TORCH=... test`.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
# The floors suite: the lowest versions pyproject claims (.ci/floors.txt), in their own environment.
VENV_FLOORS ?= .venv-floors
PYF := $(VENV_FLOORS)/bin/python
# The tests that import a pinned package (transformers, TRL, peft, accelerate, deepspeed); the others do not
# depend on the floors.
FLOORS_TESTS ?= tests/test_integrations_transformers.py tests/test_integrations_trl.py tests/test_packing.py \
	tests/test_distributed_head.py tests/test_distributed.py tests/test_distributed_trainers.py \
	tests/test_vocab_parallel.py tests/test_losses.py

.PHONY: demo test lint docs test-floors test-compile-triton36 venv clean

# The compile guard also runs against triton 3.6 (what the GPU machines we benchmark on run), in its own venv:
# torch as above, then triton 3.6.0 without dependencies (the guard needs only its compiler and ptxas).
TRITON36_VENV ?= .venv-triton36
TRITON36 ?= triton==3.6.0


$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,bench,trl,test-trl]'
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

# ruff, configured in pyproject.toml (installed by the test extra).
lint: venv
	$(PY) -m ruff check fastdpo kernels benchmarks tests

# The documentation site (docs/, mkdocs.yml) must build without a warning: a broken link or a page outside the nav
# fails it.
docs: venv
	$(PY) -m mkdocs build --strict -q -d build/site

# torch comes from pip (a local CPU wheel may serve it), the rest from uv, which resolves the pins in seconds.
$(VENV_FLOORS)/.installed: pyproject.toml Makefile .ci/floors.txt
	rm -rf $(VENV_FLOORS)
	$(PYTHON) -m venv $(VENV_FLOORS)
	$(PYF) -m pip install -q --upgrade pip
	$(PYF) -m pip install -q "$(TORCH)" uv
	$(PYF) -m uv pip install -q --python $(PYF) -e '.[test,bench,trl,test-trl]' -c .ci/floors.txt
	touch $@

# pytest's exit code 5 (no test collected) is no failure here.
test-floors: $(VENV_FLOORS)/.installed
	@$(PYF) -m pip list 2>/dev/null | grep -iE '^(torch|transformers|trl|peft|accelerate|deepspeed) '
	$(PYF) -m pytest -q -p no:cacheprovider $(FLOORS_TESTS); rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

clean:
	rm -rf $(VENV) $(VENV_FLOORS) $(TRITON36_VENV) build dist *.egg-info
