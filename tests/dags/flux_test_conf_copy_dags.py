"""A copy whose ``source`` comes from the DAG run's conf: what anyone allowed to trigger the DAG
controls (issue #22). Rendered as native objects, so the conf's dict reaches the operator as is.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

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
