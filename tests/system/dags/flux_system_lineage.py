"""The DAG of tests/system/test_real_airflow.py's lineage-and-metrics test, on a real scheduler.

An edit of an image in S3 (``s3://flux-system/in/x.jpg``) copied under ``lineage/{run_id}/``,
and a batch of three prompts (one refused by the emulator, allowed) that writes its results
file: the openlineage provider's file transport and a StatsD listener, set up by the test,
see what each task read, wrote and paid for. Its own connection (``flux_lineage``), its own
emulator.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_flux.operators import FluxBatchGenerateOperator, FluxGenerateOperator
from airflow_flux.transfers import FluxToS3Operator

BUCKET = "flux-system"
INPUT = f"s3://{BUCKET}/in/x.jpg"
REFUSED_PROMPT = "a fox the lineage test has refused"

with DAG(
    "flux_system_lineage",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["flux", "system-test"],
):
    edit = FluxGenerateOperator(
        task_id="edit",
        prompt="the same fox, in blue",
        image_url=INPUT,
        endpoint="fal-ai/flux-pro/kontext",
        flux_conn_id="flux_lineage",
        poll_interval=0.5,
    )
    FluxToS3Operator(task_id="copy", source=edit.output, s3_bucket=BUCKET, s3_key_prefix="lineage/{{ run_id }}")
    FluxBatchGenerateOperator(
        task_id="batch",
        requests=["a red fox", "a grey fox", REFUSED_PROMPT],
        allow_failures=1,
        flux_conn_id="flux_lineage",
        results_s3_bucket=BUCKET,
        poll_interval=0.5,
    )
