# Set-up is part of each target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch that lies on this machine's disk (no CUDA download).
	$(PY) -m pip install -q torch==2.13.0
	# Pinned again here: without it pip may swap in a CUDA build of torch while resolving the rest.
	$(PY) -m pip install -q -e '.[test]' torch==2.13.0
	touch $@

.PHONY: setup demo test test-gpu
setup: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/llava-ray demo

test: $(VENV)/.installed
	$(PY) -m pytest

# On a CUDA machine: the vllm extra (it brings its own CUDA build of torch) and the gpu tests.
GPU_VENV ?= .venv-gpu
test-gpu:
	python3 -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q -e '.[test,vllm]'
	$(GPU_VENV)/bin/python -m pytest -m gpu -s
