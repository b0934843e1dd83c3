# airflow-flux: every target sets up what it needs (venv with uv) on a fresh machine.
SHELL := /bin/bash
comma := ,
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
STAMP := $(VENV)/.installed-stamp

.PHONY: venv test test-compat compat-one test-distributed lint typecheck pytest emulator demo demo-ui bench bench-scale clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@test -x $(UV) || $(PY) -m pip install -q uv
	$(UV) pip install -q -p $(PY) -e ".[emulator,thumbnails,openlineage,test]"
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the package with its test extras

lint: venv ## ruff over code, tests and examples
	$(VENV)/bin/ruff check airflow_flux tests dags demo bench
	$(VENV)/bin/ruff format --check airflow_flux tests dags demo bench

typecheck: venv ## mypy over the package
	$(VENV)/bin/mypy airflow_flux

# The browser tests save a screenshot of each gallery page here, for a person to look at.
SCREENSHOTS := $(CURDIR)/build/screenshots

# Two phases. The tests that start stacks of their own (a real scheduler and triggerer, the
# CeleryExecutor stack, the demo's processes) run one at a time, alone on the machine, so that
# no heartbeat or health check of theirs competes with other tests for CPU. The rest run first
# in PYTEST_WORKERS processes (pytest-xdist): each process has its own AIRFLOW_HOME, metadata DB
# and moto server (tests/conftest.py), and takes whole test files, so module fixtures start once.
# Exit status 5 (nothing collected, e.g. PYTEST_ARGS="-k ..." selects one phase only) is no failure.
PYTEST_WORKERS ?= 2
PYTEST_ALONE := tests/distributed tests/system tests/dags_examples
define run_phase
$(1); s=$$?; if [ $$s -ne 0 ] && [ $$s -ne 5 ]; then status=$$s; fi;
endef

pytest: venv
	@rm -rf $(SCREENSHOTS)
	@export FLUX_SCREENSHOTS_DIR=$(SCREENSHOTS); status=0; \
	  $(call run_phase,$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=10 $(addprefix --ignore=,$(PYTEST_ALONE)) $(PYTEST_ARGS)) \
	  $(call run_phase,$(PY) -m pytest -q --durations=10 $(PYTEST_ALONE) $(PYTEST_ARGS)) \
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

SCALE_SIZES ?= 1000
SCALE_CONCURRENCY ?= 10
SCALE_SECONDS ?= 3
bench-scale: venv ## one batch of SCALE_SIZES prompts (issue #24; 1,000 at C=10, T=3 s: about 7 min), figures in bench/ANALYSIS.md
	$(PY) bench/batch_scale.py --sizes $(SCALE_SIZES) --concurrency $(SCALE_CONCURRENCY) --seconds $(SCALE_SECONDS) $(SCALE_ARGS)

# Other Airflow releases, from a built wheel (not this checkout): the package is built,
# installed into its own venv per release, and the tests run from a copy that has no
# airflow_flux/ next to them, so they import the wheel's. "lowest" installs what the
# pyproject allows at its floors (uv's lowest-direct: apache-airflow 3.1.1, the amazon
# provider's 9.6, ...), the rest at the newest versions those allow.
COMPAT_AIRFLOW ?= 3.1.8 3.2.2 lowest
COMPAT_TESTS ?= tests/test_state.py tests/test_identity.py tests/test_models.py tests/test_lineage.py tests/operators tests/hooks/test_connection_form.py \
	tests/dags_examples/test_example_dags.py::test_every_dag_file_imports_without_errors_or_network \
	--ignore=tests/operators/test_flux2.py --ignore=tests/operators/test_batch_requests.py
# The real scheduler and triggerer's run, alone after the rest (as in make test).
COMPAT_ALONE ?= tests/system/test_real_airflow.py::test_retry_reuses_and_clear_after_a_list_change_submits_anew
# The lowest leg answers for the dependency floors (amazon provider, boto3, moto, Pillow,
# pydantic...); the Airflow behaviour of its release (3.1) is the 3.1.8 leg's, so it skips the
# three slowest tests of that behaviour (the real scheduler's retry, the retries' reuse over
# dag.test(), a mapped expand): about 3.5 minutes of CI's 45.
COMPAT_ALONE_lowest :=
compat_alone = $(if $(filter undefined,$(origin COMPAT_ALONE_$(V))),$(COMPAT_ALONE),$(COMPAT_ALONE_$(V)))
COMPAT_SKIP_lowest := --deselect tests/operators/test_reuse.py::test_retries_reuse_only_the_request_they_would_submit \
	--deselect tests/operators/test_flux_operators.py::test_expand_over_five_prompts
# Left out above (they run on the newest Airflow in `make test`): FLUX.2's request fields and the
# batch's requests file touch nothing that differs between Airflow releases (validation, the
# emulator, S3), and they cost CI about 100 s a release, out of its 45 minutes.
# What Airflow 3.2.2's constraints file pinned, where newer releases break 3.2.2 itself:
# from fastapi 0.137 its execution API cannot be built (pydantic: "TITerminalStatePayload
# needs a discriminator"; 3.3 caps fastapi below 0.137), and with svcs 26 its in-process
# execution API (dag.test()) never gets its service registry ("no attribute svcs_registry").
COMPAT_PINS_3.2.2 := 'fastapi<0.137' 'svcs<26'
# Airflow 3.1.1 as released, with what its constraints file pinned where newer releases
# break it: structlog 25.5 renamed dev.Styles, PyJWT 2.11 refuses the token's empty issuer
# (3.1.8 needs neither pin).
COMPAT_PINS_lowest := 'structlog<25.5' 'pyjwt<2.11'
WHEEL_EXTRAS := emulator,thumbnails,openlineage,test

test-compat: venv ## identity/resume tests, example DAGs' parse, a real scheduler+triggerer retry on each COMPAT_AIRFLOW (3.1.8 3.2.2 lowest), from a wheel
	rm -rf build/dist
	$(UV) build -q --wheel -o build/dist .
	@set -e; for v in $(COMPAT_AIRFLOW); do $(MAKE) --no-print-directory compat-one V=$$v; done

compat-one:
	@echo "== test-compat: Airflow $(V)"
	rm -rf build/compat-$(V)/src
	@test -x build/compat-$(V)/venv/bin/python || $(UV) venv -q -p $(PY) build/compat-$(V)/venv
	printf '%s\n' $(COMPAT_PINS_$(V)) > build/compat-$(V)/constraints.txt
ifeq ($(V),lowest)
	$(UV) pip install -q -p build/compat-$(V)/venv/bin/python --reinstall-package airflow-flux \
	  --resolution lowest-direct -c build/compat-$(V)/constraints.txt \
	  -r pyproject.toml $(foreach e,$(subst $(comma), ,$(WHEEL_EXTRAS)),--extra $(e)) \
	  "airflow-flux[$(WHEEL_EXTRAS)] @ file://$(CURDIR)/$$(ls build/dist/*.whl)"
else
	echo "apache-airflow==$(V)" > build/compat-$(V)/override.txt
	$(UV) pip install -q -p build/compat-$(V)/venv/bin/python --reinstall-package airflow-flux \
	  --override build/compat-$(V)/override.txt -c build/compat-$(V)/constraints.txt "apache-airflow==$(V)" \
	  "airflow-flux[$(WHEEL_EXTRAS)] @ file://$(CURDIR)/$$(ls build/dist/*.whl)"
endif
	mkdir -p build/compat-$(V)/src && cp -r tests dags demo pyproject.toml build/compat-$(V)/src/
	cd build/compat-$(V)/src && ../venv/bin/python -c "import airflow_flux, airflow; \
	  assert 'site-packages' in airflow_flux.__file__, airflow_flux.__file__; print('airflow', airflow.__version__, airflow_flux.__file__)"
	cd build/compat-$(V)/src && ../venv/bin/python -m pytest -q -p no:randomly -n $(PYTEST_WORKERS) --dist loadfile \
	  --durations=15 $(COMPAT_TESTS) $(COMPAT_SKIP_$(V)) $(PYTEST_ARGS)
	$(if $(strip $(compat_alone)),cd build/compat-$(V)/src && ../venv/bin/python -m pytest -q -p no:randomly $(compat_alone) $(PYTEST_ARGS))

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache build
