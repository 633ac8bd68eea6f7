# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA driver, ask for the CPU build of torch so pip does not pull
# multi-GB CUDA wheels; override with `make TORCH=... test`.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch>=2.4,torch==2.13.0)

.PHONY: demo test venv clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m fastdpo bench

test: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build dist *.egg-info
