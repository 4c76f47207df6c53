# Two entry points for a fresh machine: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of torch first (see docs/install.md); a GPU user installs their own CUDA torch beforehand.
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
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
