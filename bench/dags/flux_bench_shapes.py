"""The three shapes bench/batch.py runs side by side on a real Airflow: N prompts -> images in S3.

* ``flux_bench_mapped_sensor``: mapped submit >> mapped deferred sensor (``flux_content_pipeline``'s shape);
* ``flux_bench_mapped_generate``: mapped ``FluxGenerateOperator`` (submit and deferred wait in one task);
* ``flux_bench_batch``: one ``FluxBatchGenerateOperator``.

Each ends with the same ``FluxToS3Operator`` into ``s3://<flux_s3_bucket>/bench/<dag>/<run_id>/``.
No per-DAG concurrency cap: the emulator's account concurrency is the API's limit.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_flux.operators import FluxBatchGenerateOperator, FluxGenerateOperator, FluxSubmitOperator
from airflow_flux.sensors import FluxStatusSensor
from airflow_flux.transfers import FluxToS3Operator

BUCKET = "{{ var.value.get('flux_s3_bucket', 'flux-images') }}"
PARAMS = {"prompts": Param([], type="array")}
COMMON: dict[str, Any] = {
    # Retries as a production DAG has them: a deferred task whose trigger fires before the
    # deferring worker has exited can be failed by the scheduler (apache/airflow#66374,
    # #72716); its retry reuses the request already paid for.
    "default_args": {"retries": 2, "retry_delay": timedelta(seconds=1)},
    "schedule": None,
    "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
    "catchup": False,
    "params": PARAMS,
    "tags": ["flux", "bench"],
}


@task
def load_prompts(**context: Any) -> list[str]:
    return list(context["params"]["prompts"])


with DAG("flux_bench_mapped_sensor", **COMMON):
    submits = FluxSubmitOperator.partial(task_id="submit").expand(prompt=load_prompts())
    waits = FluxStatusSensor.partial(task_id="wait", poll_interval=0.5, timeout=1800).expand(request=submits.output)
    FluxToS3Operator(
        task_id="to_s3", source=waits.output, s3_bucket=BUCKET, s3_key_prefix="bench/{{ dag.dag_id }}/{{ run_id }}"
    )

with DAG("flux_bench_mapped_generate", **COMMON):
    generates = FluxGenerateOperator.partial(task_id="generate", poll_interval=0.5, wait_timeout=1800).expand(
        prompt=load_prompts()
    )
    FluxToS3Operator(
        task_id="to_s3", source=generates.output, s3_bucket=BUCKET, s3_key_prefix="bench/{{ dag.dag_id }}/{{ run_id }}"
    )

with DAG("flux_bench_batch", **COMMON):
    batch = FluxBatchGenerateOperator(
        task_id="generate", requests=load_prompts(), poll_interval=0.5, max_poll_interval=5, wait_timeout=1800
    )
    FluxToS3Operator(
        task_id="to_s3", source=batch.output, s3_bucket=BUCKET, s3_key_prefix="bench/{{ dag.dag_id }}/{{ run_id }}"
    )
