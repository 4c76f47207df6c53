# Two entry points for a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch first (see docs/install.md); a GPU user installs their own CUDA torch beforehand. From PyPI on
# Linux x86_64 torch is the CUDA build (it runs on CPU too); the small CPU-only wheel comes from
# make TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
TRITON_SPEC ?= triton==3.7.1

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(PY) -m pip install -q "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m resampling_forcing.demo

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf outputs/demo
