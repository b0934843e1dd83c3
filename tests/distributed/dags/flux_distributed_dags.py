"""The DAGs tests/distributed runs on Celery workers, PostgreSQL and two triggerers.

* ``flux_dist_pipeline``: ``flux_content_pipeline``'s shape (load >> mapped submit >> mapped
  deferred sensor >> copy), its in-flight cap raised so that every wait is deferred at once;
* ``flux_dist_killed_submit``: a submit whose process kills itself right after its submit on
  try 1 (a worker lost at the worst moment), retried by the scheduler;
* ``flux_dist_batch``: the same prompts as one ``FluxBatchGenerateOperator`` and the copy;
* ``flux_dist_window``: a batch larger than its window (a window in the worker, its slots in
  Variables and its checkpoints in S3), whose worker the test kills mid-window.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task

from airflow_flux.operators import FluxBatchGenerateOperator, FluxSubmitOperator
from airflow_flux.sensors import FluxStatusSensor
from airflow_flux.transfers import FluxToS3Operator

BUCKET = "flux-distributed"
COMMON: dict[str, Any] = {
    "schedule": None,
    "start_date": pendulum.datetime(2026, 1, 1, tz="UTC"),
    "catchup": False,
    "params": {"prompts": Param([], type="array")},
    "tags": ["flux", "distributed-test"],
}


@task
def load_prompts(**context: Any) -> list[str]:
    return list(context["params"]["prompts"])


def kill_own_process_on_first_try(context: Any, result: Any = None) -> None:
    """A ``post_execute`` hook: the task's process dies (SIGKILL) right after its submit on try 1."""
    if context["ti"].try_number == 1:
        os.kill(os.getpid(), signal.SIGKILL)


with DAG("flux_dist_pipeline", **COMMON):
    submits = FluxSubmitOperator.partial(task_id="submit", max_active_tis_per_dag=24, retries=2).expand(
        prompt=load_prompts()
    )
    waits = FluxStatusSensor.partial(
        task_id="wait", timeout=600, poll_interval=0.5, max_active_tis_per_dag=24, retries=2
    ).expand(request=submits.output)
    FluxToS3Operator(task_id="to_s3", source=waits.output, s3_bucket=BUCKET, s3_key_prefix="dist/{{ run_id }}")

with DAG("flux_dist_killed_submit", **COMMON):
    killed = FluxSubmitOperator(
        task_id="submit",
        prompt="a fox whose worker died after paying",
        retries=1,
        retry_delay=timedelta(seconds=1),
        post_execute=kill_own_process_on_first_try,
    )
    FluxStatusSensor(task_id="wait", request=killed.output, timeout=300, poll_interval=0.5)

with DAG("flux_dist_batch", **COMMON):
    # max_in_flight above the 24 prompts: submitted at once and awaited in one trigger, the shape
    # whose triggerer the test kills (a larger batch runs as a window in the worker).
    batch = FluxBatchGenerateOperator(
        task_id="generate", requests=load_prompts(), poll_interval=0.5, retries=2, max_in_flight=50
    )
    FluxToS3Operator(task_id="to_s3", source=batch.output, s3_bucket=BUCKET, s3_key_prefix="dist-batch/{{ run_id }}")

with DAG("flux_dist_window", **COMMON):
    # max_in_flight below the 24 prompts: a window in the worker. What a retry on another
    # worker reads is in the slots (Variables) and the checkpoints (S3, under the results key).
    window = FluxBatchGenerateOperator(
        task_id="generate",
        requests=load_prompts(),
        poll_interval=0.5,
        retries=1,
        retry_delay=timedelta(seconds=1),
        max_in_flight=4,
        results_s3_bucket=BUCKET,
    )
    FluxToS3Operator(task_id="to_s3", source=window.output, s3_bucket=BUCKET, s3_key_prefix="dist-window/{{ run_id }}")
