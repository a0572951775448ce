# specs_jax: `make demo` runs the whole SPECS pipeline on the embedded tiny demo; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: setup setup-test demo test test-fast test-slow bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

setup: $(VENV)/.installed          ## runtime install into .venv
setup-test: $(VENV)/.installed-test ## runtime + test extras (pytest, torch CPU for the HF reference)

demo: setup                        ## the whole SPECS pipeline on the embedded tiny demo (CPU)
	$(BIN)/python -m specs_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: setup-test                   ## all tests (CI)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup-test              ## skip tests marked slow
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup-test                  ## CPU benchmarks against HF PyTorch, one JSON line per figure
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
