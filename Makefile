# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA driver, ask for the CPU build of torch so pip does not pull
# multi-GB CUDA wheels; override with `make TORCH=... test`.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)
# The floors suite's environment: the lowest versions pyproject claims, pinned by .ci/floors-*.txt.
VENV_FLOORS ?= .venv-floors
PYF := $(VENV_FLOORS)/bin/python
UV_INSTALL := $(PYF) -m uv pip install -q --python $(PYF)
# pytest's exit code 5 (no test collected) is no failure here.
PYTEST_FLOORS := $(PYF) -m pytest -q -p no:cacheprovider
PYTEST_OK := rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]
# The tests that import the pinned packages: without TRL (transformers, peft, accelerate, deepspeed) ...
FLOORS_CORE_TESTS ?= tests/test_integrations_transformers.py tests/test_distributed_head.py tests/test_distributed.py \
	tests/test_packing.py tests/test_vocab_parallel.py tests/test_adversarial.py
# ... and with TRL at the `trl` extra's floors.
FLOORS_TRL_TESTS ?= tests/test_integrations_trl.py tests/test_distributed_trainers.py tests/test_distributed.py \
	tests/test_packing.py

.PHONY: demo test test-floors venv clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,bench,trl,test-trl]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m fastdpo bench

test: venv
	$(PY) -m pytest -q

# torch comes from pip (a local CPU wheel may serve it), the rest from uv, which resolves the pins in seconds.
$(VENV_FLOORS)/.created: Makefile
	rm -rf $(VENV_FLOORS)
	$(PYTHON) -m venv $(VENV_FLOORS)
	$(PYF) -m pip install -q --upgrade pip
	$(PYF) -m pip install -q "$(TORCH)" uv
	touch $@

# The suite at the lowest versions pyproject claims: first the library without TRL at the core floors, then the
# `trl` extra at its floors (TRL's own requirements raise transformers and accelerate there).
test-floors: $(VENV_FLOORS)/.created
	$(PYF) -m uv pip uninstall -q --python $(PYF) trl 2>/dev/null || true
	$(UV_INSTALL) -e '.[test,bench]' -c .ci/floors-core.txt
	$(PYF) -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|deepspeed|trl) '
	$(PYTEST_FLOORS) $(FLOORS_CORE_TESTS); $(PYTEST_OK)
	$(UV_INSTALL) -e '.[test,bench,trl,test-trl]' -c .ci/floors-trl.txt
	$(PYF) -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|deepspeed|trl) '
	$(PYTEST_FLOORS) $(FLOORS_TRL_TESTS); $(PYTEST_OK)

clean:
	rm -rf $(VENV) $(VENV_FLOORS) build dist *.egg-info
