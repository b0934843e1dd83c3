"""Copies whose images come from where a DAG run decides (issue #22).

``flux_test_copy_from_conf``: the ``source`` is the run's conf, what anyone allowed to trigger
the DAG controls (rendered as native objects, so the conf's dict reaches the operator as is).
``flux_test_generate_on_a_connection_then_copy``: a result made on the connection the conf
names, copied by a task that names none.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_flux.operators import FluxGenerateOperator
from airflow_flux.transfers import FluxToS3Operator

with DAG(
    "flux_test_copy_from_conf",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    render_template_as_native_obj=True,
):
    FluxToS3Operator(
        task_id="to_s3",
        source="{{ dag_run.conf['source'] }}",
        s3_bucket="{{ dag_run.conf['bucket'] }}",
        s3_key_prefix="from-conf",
    )

with DAG(
    "flux_test_generate_on_a_connection_then_copy",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
):
    # The copy names no connection: the result says which one it was made with.
    generate = FluxGenerateOperator(
        task_id="generate",
        prompt="a fox on another account",
        flux_conn_id="{{ dag_run.conf['conn'] }}",
        poll_interval=0.2,
        wait_timeout=60,
    )
    FluxToS3Operator(task_id="to_s3", source=generate.output, s3_bucket="{{ dag_run.conf['bucket'] }}")
