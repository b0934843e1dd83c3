"""The DAG of tests/system/test_real_airflow.py's retry-and-clear test, on a real scheduler.

A mapped submit over a prompt list read from a Variable (so the test can change the list
and clear the run), a submit that fails right after its submit on try 1 (a ``post_execute``
hook, as a lost worker) and is retried automatically, and the copy of the mapped results to
S3 with a manifest. Only the submits name the connection (``flux_reuse``, its own emulator):
the sensors use the one their handle records.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Variable, task

from airflow_flux.operators import FluxSubmitOperator
from airflow_flux.sensors import FluxStatusSensor
from airflow_flux.transfers import FluxToS3Operator

PROMPTS_VARIABLE = "flux_system_prompts"
BUCKET = "flux-system"


#: A wait's retry costs nothing (it pays for no request); it covers an Airflow race where a
#: trigger that fires at once lets the resumed attempt start before the scheduler drains the
#: deferral's own exit event, which then fails the running attempt ("state mismatch",
#: apache/airflow#71580 and #72716, open in 3.3). Seen here under load on a real scheduler.
WAIT_RETRIES = {"retries": 1, "retry_delay": timedelta(seconds=1)}


def lose_worker_on_first_try(context, result=None):
    if context["ti"].try_number == 1:
        raise RuntimeError("worker lost right after submit")


with DAG(
    "flux_system_reuse",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["flux", "system-test"],
):

    @task
    def prompts() -> list[str]:
        return Variable.get(PROMPTS_VARIABLE, deserialize_json=True)

    submits = FluxSubmitOperator.partial(task_id="submit", flux_conn_id="flux_reuse").expand(prompt=prompts())
    waits = FluxStatusSensor.partial(task_id="wait", poll_interval=0.5, timeout=120, **WAIT_RETRIES).expand(
        request=submits.output
    )
    FluxToS3Operator(task_id="to_s3", source=waits.output, s3_bucket=BUCKET, s3_key_prefix="reuse/{{ run_id }}")

    flaky = FluxSubmitOperator(
        task_id="flaky_submit",
        prompt="a fox submitted once per run",
        flux_conn_id="flux_reuse",
        retries=1,
        retry_delay=timedelta(seconds=1),
        post_execute=lose_worker_on_first_try,
    )
    FluxStatusSensor(task_id="flaky_wait", request=flaky.output, poll_interval=0.5, timeout=120, **WAIT_RETRIES)
