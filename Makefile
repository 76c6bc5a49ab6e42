# Set-up is part of each target: a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# pip takes the CPU build of torch that lies on this machine's disk (no CUDA download); uv
	# installs the rest in a third of pip's time. uv reads none of pip's configuration (its local
	# wheels), so torch is pinned again for uv to keep the installed build, checked after; the
	# bytecode is compiled as pip does (every Ray worker imports torch and transformers).
	$(PY) -m pip install -q torch==2.13.0 uv
	$(VENV)/bin/uv pip install -q --python $(PY) --compile-bytecode -e '.[test]' torch==2.13.0
	$(PY) -c "import torch, sys; sys.exit(torch.version.cuda and 'a CUDA build of torch was installed: ' + torch.__version__)"
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
