"""The daily pipeline as one batch task: prompts in, images and a manifest in S3.

    load_prompts ──> generate (one task: every prompt submitted, one deferred wait) ──> to_s3

The volume shape of ``flux_content_pipeline``: instead of two mapped task instances per
image (a submit and a wait, each a scheduling round trip, a worker start, a deferral and a
resume), one ``FluxBatchGenerateOperator`` submits the prompts from the worker and waits
for them at the API's own speed (fal runs an account's requests a few at a time and queues
the rest): a few dozen at once in one trigger, more as a window of ``max_in_flight`` (twice
the connection's ``concurrency``). Its results go to a JSON Lines file in S3. Choose mapping when each image should be its own task
(retried, cleared and watched one by one); choose the batch for hundreds of images a day.
``bench/RESULTS.md`` (part 5) has the measured difference.

* Prompts come from ``dags/prompts/daily.txt``, or from the run's ``{"prompts": [...]}``.
* ``max_images`` refuses, before anything is paid for, a batch that grew by mistake;
  ``allow_failures`` lets a few refused prompts (content policy) not fail the day: the
  manifest lists them as failed. A retry pays only for what failed for a passing reason.

Connections: ``flux_default`` and ``aws_default``; bucket: the Variable ``flux_s3_bucket``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset, Param, task

from airflow_flux.operators import FluxBatchGenerateOperator
from airflow_flux.transfers import FluxToS3Operator

PROMPTS_FILE = Path(__file__).parent / "prompts" / "daily.txt"
S3_BUCKET = "{{ var.value.get('flux_s3_bucket', 'flux-images') }}"
#: A cost guard: the batch never generates more images than this.
MAX_IMAGES = 500
DAILY_IMAGES = Asset("flux_daily_batch_images")

with DAG(
    dag_id="flux_batch_pipeline",
    description="Daily prompts -> one FLUX.1 Kontext [pro] batch -> S3, with a manifest",
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
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
        return [p for p in prompts if p]

    batch = FluxBatchGenerateOperator(
        task_id="generate",
        requests=load_prompts(),
        aspect_ratio="16:9",
        max_images=MAX_IMAGES,
        allow_failures=2,
        wait_timeout=2 * 60 * 60,
        # One line per prompt in S3 (other jobs read it), a small summary in XCom: the shape
        # that holds from ten prompts to a hundred thousand.
        results_s3_bucket=S3_BUCKET,
    )
    FluxToS3Operator(
        task_id="to_s3",
        source=batch.output,
        s3_bucket=S3_BUCKET,
        s3_key_prefix="flux/batch/{{ run_id }}",
        outlets=[DAILY_IMAGES],
    )
