# airflow-flux: every target sets up what it needs (venv with uv) on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test test-compat test-distributed lint typecheck pytest emulator demo demo-ui bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install -q -p $(PY) -e ".[emulator,thumbnails,test]"
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

# The oldest supported Airflow, from a built wheel (not this checkout): the package is built,
# installed into its own venv beside apache-airflow==$(COMPAT_AIRFLOW), and the tests run
# from a copy that has no airflow_flux/ next to them, so they import the wheel's.
COMPAT_AIRFLOW ?= 3.1.8
COMPAT := build/compat-$(COMPAT_AIRFLOW)
COMPAT_TESTS ?= tests/test_state.py tests/test_identity.py tests/test_models.py tests/operators \
	tests/dags_examples/test_example_dags.py::test_every_dag_file_imports_without_errors_or_network \
	tests/system/test_real_airflow.py::test_retry_reuses_and_clear_after_a_list_change_submits_anew

test-compat: venv ## identity/resume tests, example DAGs' parse, a real scheduler+triggerer retry on Airflow $(COMPAT_AIRFLOW), from a wheel
	rm -rf build/dist $(COMPAT)/src
	$(UV) build -q --wheel -o build/dist .
	@test -x $(COMPAT)/venv/bin/python || $(UV) venv -q -p $(PY) $(COMPAT)/venv
	echo "apache-airflow==$(COMPAT_AIRFLOW)" > $(COMPAT)/override.txt
	$(UV) pip install -q -p $(COMPAT)/venv/bin/python --reinstall-package airflow-flux \
	  --override $(COMPAT)/override.txt "apache-airflow==$(COMPAT_AIRFLOW)" \
	  "airflow-flux[emulator,thumbnails,test] @ file://$(CURDIR)/$$(ls build/dist/*.whl)"
	mkdir -p $(COMPAT)/src && cp -r tests dags demo pyproject.toml $(COMPAT)/src/
	cd $(COMPAT)/src && ../venv/bin/python -c "import airflow_flux, airflow; \
	  assert 'site-packages' in airflow_flux.__file__, airflow_flux.__file__; print('airflow', airflow.__version__, airflow_flux.__file__)"
	cd $(COMPAT)/src && ../venv/bin/python -m pytest -q -p no:randomly $(COMPAT_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build
