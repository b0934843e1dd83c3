"""The DAG that tests/system/test_real_airflow.py runs on a real scheduler, dag-processor and triggerer.

A module-level DAG in its own folder (the test's ``AIRFLOW__CORE__DAGS_FOLDER``), so the
DAG processor parses only this file. It uses the ``flux_default`` connection, which the
test points at an in-process emulator through ``AIRFLOW_CONN_FLUX_DEFAULT``.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_flux.operators import FluxSubmitOperator
from airflow_flux.sensors import FluxStatusSensor

with DAG(
    "flux_system_submit_sensor",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["flux", "system-test"],
):
    submit = FluxSubmitOperator(task_id="submit", prompt="a fox seen by a real scheduler", flux_conn_id="flux_default")
    # deferrable is the default: the wait runs in the triggerer.
    FluxStatusSensor(task_id="wait", request=submit.output, timeout=300, flux_conn_id="flux_default")
