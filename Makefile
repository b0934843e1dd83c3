# airflow-flux: every target sets up what it needs (venv with uv) on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test lint typecheck pytest emulator clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install -q -p $(PY) -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the package with its test extras

lint: venv ## ruff over code, tests and examples
	$(VENV)/bin/ruff check airflow_flux tests
	$(VENV)/bin/ruff format --check airflow_flux tests

typecheck: venv ## mypy over the package
	$(VENV)/bin/mypy airflow_flux

pytest: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest ## everything CI runs

emulator: venv ## run the fal queue emulator on :8787
	$(PY) -m airflow_flux.emulator --port 8787

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
