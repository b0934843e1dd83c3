# airflow-flux: every target sets up what it needs (venv with uv) on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test test-distributed lint typecheck pytest emulator demo demo-ui bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install -q -p $(PY) -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the package with its test extras

lint: venv ## ruff over code, tests and examples
	$(VENV)/bin/ruff check airflow_flux tests dags demo bench
	$(VENV)/bin/ruff format --check airflow_flux tests dags demo bench

typecheck: venv ## mypy over the package
	$(VENV)/bin/mypy airflow_flux

# The browser tests save a screenshot of each gallery page here, for a person to look at.
SCREENSHOTS := $(CURDIR)/build/screenshots

pytest: venv
	@rm -rf $(SCREENSHOTS)
	@FLUX_SCREENSHOTS_DIR=$(SCREENSHOTS) $(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	  if ls $(SCREENSHOTS)/*.png >/dev/null 2>&1; then \
	    echo "Gallery screenshots (headless Chromium): $(SCREENSHOTS)"; fi; \
	  exit $$status

test: lint typecheck pytest ## everything CI runs (tests/distributed included)

test-distributed: venv ## CeleryExecutor + PostgreSQL + Redis + 2 workers + 2 triggerers, processes killed mid-run (needs postgresql, redis-server)
	$(PY) -m pytest -q -p no:randomly tests/distributed $(PYTEST_ARGS)

emulator: venv ## run the fal queue emulator on :8787
	$(PY) -m airflow_flux.emulator --port 8787

# DEMO_ARGS passes options on, e.g. make demo DEMO_ARGS="--prompt 'a red fox' --verbose".
# FLUX_DEMO_REAL=1 FLUX_API_TOKEN=... [FLUX_API_BASE=https://...] uses the real API.
demo: venv ## flux_content_pipeline on the emulator and a local S3; images in ./demo-output
	$(PY) -m demo.run_demo $(DEMO_ARGS)

demo-ui: venv ## the same on a real Airflow, UI on http://127.0.0.1:8080; Ctrl-C stops it (FLUX_DEMO_UI_ONCE=1: one run)
	$(PY) -m demo.ui $(DEMO_ARGS)

bench: venv ## the benchmarks (issues #6 and #14, ~20 min on 2 cores), rewrites bench/RESULTS.md; BENCH_ARGS=--quick for a smoke run
	$(PY) bench/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
