"""Daily FLUX.1 Kontext [pro] batch: prompts in, images and a manifest in S3, an Asset event out.

    load_prompts ──> submit[i] ──> wait[i] ──> to_s3 ──> Asset "flux_daily_images"
    (file or         (mapped:      (mapped:    (one copy of the whole batch,
     run params)      paid call)    deferred)   plus manifest.json)

* Prompts come from ``dags/prompts/daily.txt`` (one per line), or from the run's
  ``{"prompts": [...]}`` when it is triggered with parameters.
* Every prompt is submitted by its own mapped task; the waits run in the triggerer
  (deferred), so a batch of pending images holds no worker slot.
* One ``FluxToS3Operator`` copies the batch to ``s3://<bucket>/flux/daily/<run_id>/`` and
  writes ``manifest.json`` there; downstream DAGs schedule on the ``flux_daily_images``
  Asset, whose event ``extra`` holds the manifest's URI and the image count.

Connections: ``flux_default`` (the API) and ``aws_default`` (S3). Bucket: the Airflow
Variable ``flux_s3_bucket`` (default ``flux-images``), read when the task runs, never
while the file is parsed.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, Param, task

from airflow_flux.operators import FluxSubmitOperator
from airflow_flux.sensors import FluxStatusSensor
from airflow_flux.transfers import FluxToS3Operator

PROMPTS_FILE = Path(__file__).parent / "prompts" / "daily.txt"
#: A cost guard: a run never submits more than this many paid requests.
MAX_PROMPTS = 50
#: Templated, so the Variable is read when the task runs (set it with
#: ``airflow variables set flux_s3_bucket my-bucket`` or ``AIRFLOW_VAR_FLUX_S3_BUCKET``).
S3_BUCKET = "{{ var.value.get('flux_s3_bucket', 'flux-images') }}"
#: fal runs 2 to 40 requests per account at once (by plan) and queues the rest. This caps
#: how many of this DAG's submits and waits are in flight (deferred tasks count).
API_CONCURRENCY = 4
#: A logical asset (the bucket is only known at run time); consumers read the event's
#: ``extra``: ``{"manifest": "s3://.../manifest.json", "images": N}``.
DAILY_IMAGES = Asset("flux_daily_images")

with DAG(
    dag_id="flux_content_pipeline",
    description="Daily prompts -> FLUX.1 Kontext [pro] -> S3, with a manifest and an Asset event",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={
        # Transient API errors are already retried inside each call (backoff, Retry-After);
        # these task retries cover the rest. A retried submit reuses its request (no new charge).
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": True,  # a bool: Airflow 3.1 takes no multiplier here
    },
    params={
        "prompts": Param(
            [], type="array", items={"type": "string"}, description="Prompts of this run; empty: dags/prompts/daily.txt"
        ),
    },
    tags=["flux", "example"],
    doc_md=__doc__,
):

    @task
    def load_prompts(**context: Any) -> list[str]:
        """The run's prompts (params) or the file's: blank lines and # comments skipped."""
        prompts = [str(p).strip() for p in context["params"].get("prompts") or []]
        if not prompts:
            lines = PROMPTS_FILE.read_text(encoding="utf-8").splitlines()
            prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        prompts = [p for p in prompts if p]
        if not prompts:
            raise ValueError(f"No prompts: neither in the run's params nor in {PROMPTS_FILE}")
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompts exceed MAX_PROMPTS={MAX_PROMPTS}")
        return prompts

    # One mapped task per prompt. Arguments known now are validated at parse time.
    submit = FluxSubmitOperator.partial(
        task_id="submit",
        aspect_ratio="16:9",
        output_format="jpeg",
        max_active_tis_per_dag=API_CONCURRENCY,
        map_index_template="{{ task.prompt | truncate(60) }}",
    ).expand(prompt=load_prompts())

    # Deferred waits: a request queued at fal waits here, in the triggerer, not in a worker.
    # On timeout the request is cancelled (nothing more is paid) and the task fails.
    wait = FluxStatusSensor.partial(
        task_id="wait",
        timeout=30 * 60,
        max_active_tis_per_dag=API_CONCURRENCY,
    ).expand(request=submit.output)

    # One task copies the whole batch; a failed copy deletes what it wrote, so a retry starts clean.
    FluxToS3Operator(
        task_id="to_s3",
        source=wait.output,
        s3_bucket=S3_BUCKET,
        s3_key_prefix="flux/daily/{{ run_id }}",
        outlets=[DAILY_IMAGES],
    )
