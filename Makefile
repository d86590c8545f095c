# Two entry points (see README): `make demo` and `make test`. Both set up the
# virtual environment idempotently first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install when none is present. On a CPU-only machine this is
# the CPU wheel; on a GPU cluster install your CUDA torch first (README) and this
# is skipped because torch is already importable.
TORCH_SPEC ?= torch==2.13.0
# DeepSpeed JIT-builds small C++ ops once per machine; keep them in one cache.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast demo bench clean

STAMP := $(VENV)/.installed

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

# Everything except the slow end-to-end tests, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(PY) -m launch.demo $(ARGS)

bench: setup
	$(PY) bench/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) .cache build *.egg-info
