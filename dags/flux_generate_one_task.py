"""One prompt to S3 with FluxGenerateOperator: submit and wait in one task, then copy.

Same result as ``flux_kontext_to_s3`` with one task fewer. The wait is still deferred to
the triggerer. Because one task covers the request from submit to completion,
``max_active_tis_per_dag`` (or a pool) on it caps the requests in flight at the API
exactly; use ``.partial(...).expand(prompt=[...])`` for a batch.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_flux.operators import FluxGenerateOperator
from airflow_flux.transfers import FluxToS3Operator

with DAG(
    dag_id="flux_generate_one_task",
    description="One prompt -> FLUX.1 Kontext [pro] -> S3, submit and wait in one task",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={"prompt": Param("a lighthouse on a basalt cliff during a storm", type="string", minLength=1)},
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    tags=["flux", "example"],
    doc_md=__doc__,
):
    generate = FluxGenerateOperator(
        task_id="generate",
        prompt="{{ params.prompt }}",
        aspect_ratio="1:1",
        wait_timeout=30 * 60,  # then the request is cancelled and the task fails
        max_active_tis_per_dag=4,  # requests of this DAG in flight at the API, at most
    )
    FluxToS3Operator(
        task_id="to_s3",
        source=generate.output,
        s3_bucket="{{ var.value.get('flux_s3_bucket', 'flux-images') }}",
    )
