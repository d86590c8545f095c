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

.PHONY: setup test test-fast test-terratorch demo bench clean

STAMP := $(VENV)/.installed

$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Test files run in TEST_WORKERS processes (pytest-xdist), each file whole in one process so that its module
# fixtures are built once; most end-to-end tests wait on subprocesses (Ray, DeepSpeed, S3) about half the time,
# which the second process fills. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup
	$(PYTEST)

# Everything except the slow end-to-end tests, for the edit-test loop.
test-fast: setup
	$(PYTEST) -m "not slow"

# The optional TerraTorch extra in its own environment: TerraTorch needs torchvision, and PyPI's Linux torchvision
# wheels load only beside a matching (CUDA) torch build, not beside the CPU wheel above. About 6 minutes and
# 7.3 GB the first time (measured on the CI machine); FUSMAE_REQUIRE_TERRATORCH turns the test's skip into a failure.
TT_VENV ?= .venv-terratorch
TT_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TT_PY := $(TT_VENV)/bin/python
TT_STAMP := $(TT_VENV)/.installed

$(TT_STAMP): requirements.txt requirements-test.txt requirements-terratorch.txt pyproject.toml
	test -x $(TT_PY) || $(PYTHON) -m venv $(TT_VENV)
	$(TT_PY) -c "import torchvision" 2>/dev/null || $(TT_PY) -m pip install -q $(TT_TORCH_SPEC)
	$(TT_PY) -m pip install -q -r requirements.txt -r requirements-test.txt -r requirements-terratorch.txt
	$(TT_PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(TT_STAMP)

test-terratorch: $(TT_STAMP)
	FUSMAE_REQUIRE_TERRATORCH=1 $(TT_PY) -m pytest -q tests/launch/export/test_terratorch_backbone.py

demo: setup
	$(PY) -m launch.demo $(ARGS)

bench: setup
	$(PY) bench/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) $(TT_VENV) .cache build *.egg-info
