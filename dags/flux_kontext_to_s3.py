"""One prompt to one image in S3: submit >> wait (deferred) >> copy to S3.

The smallest useful FLUX.1 Kontext [pro] DAG. Trigger it with a prompt
(``airflow dags trigger flux_kontext_to_s3 -c '{"prompt": "a red fox in snow"}'`` or the
UI's trigger form). Connections: ``flux_default`` and ``aws_default``; bucket: the Airflow
Variable ``flux_s3_bucket`` (default ``flux-images``).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_flux.operators import FluxSubmitOperator
from airflow_flux.sensors import FluxStatusSensor
from airflow_flux.transfers import FluxToS3Operator

with DAG(
    dag_id="flux_kontext_to_s3",
    description="One prompt -> FLUX.1 Kontext [pro] -> S3",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={
        "prompt": Param("a red fox curled up asleep in fresh snow", type="string", minLength=1),
        "aspect_ratio": Param("16:9", enum=["21:9", "16:9", "4:3", "3:2", "1:1", "2:3", "3:4", "9:16", "9:21"]),
    },
    tags=["flux", "example"],
    doc_md=__doc__,
):
    # Validates the request, pays for it once, returns its handle (request_id and URLs) as XCom.
    submit = FluxSubmitOperator(
        task_id="submit",
        prompt="{{ params.prompt }}",
        aspect_ratio="{{ params.aspect_ratio }}",
        retries=2,  # a retry reuses the request already submitted: no second charge
    )
    # Checks once, then waits in the triggerer; returns the result (image URLs, seed, ...).
    wait = FluxStatusSensor(task_id="wait", request=submit.output, timeout=30 * 60)
    # Streams the image into S3 under flux/flux_kontext_to_s3/<run_id>/, with a manifest.
    to_s3 = FluxToS3Operator(
        task_id="to_s3",
        source=wait.output,
        s3_bucket="{{ var.value.get('flux_s3_bucket', 'flux-images') }}",
        retries=2,
    )
    submit >> wait >> to_s3  # already implied by the XComArgs; spelled out for the reader
