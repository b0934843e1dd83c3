"""Edit every image under an S3 prefix with FLUX.1 Kontext [pro]: list >> edit (mapped) >> copy.

"The product shots of yesterday's run, now on a winter background." The amazon provider's
``S3ListOperator`` lists the prefix, each image becomes one ``FluxGenerateOperator``
edit (``fal-ai/flux-pro/kontext``) of its ``s3://`` URI, which the operator hands fal as a
presigned GET URL (the bucket stays private; the URL is never logged or stored), and
``FluxToS3Operator`` copies the edits with a manifest that lists each edit's input and cost.

Trigger it with the bucket, the prefix and the edit
(``airflow dags trigger flux_edit_from_s3 -c '{"bucket": "shop", "prefix": "products/", "prompt": "..."}'``).
Connections: ``flux_default`` and ``aws_default``. ``max_images`` refuses a run that would
edit more images than that, before anything is paid for.
"""

from __future__ import annotations

import pendulum
from airflow.providers.amazon.aws.operators.s3 import S3ListOperator
from airflow.sdk import DAG, Param, task

from airflow_flux.models import KONTEXT_EDIT
from airflow_flux.operators import FluxGenerateOperator
from airflow_flux.transfers import FluxToS3Operator

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

with DAG(
    dag_id="flux_edit_from_s3",
    description="The images under an S3 prefix -> FLUX.1 Kontext [pro] edits -> S3",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={
        "bucket": Param("flux-images", type="string", minLength=3),
        "prefix": Param("flux/inputs/", type="string"),
        "prompt": Param("the same scene on a snowy winter day, soft morning light", type="string", minLength=1),
        "max_images": Param(20, type="integer", minimum=1),
    },
    tags=["flux", "example"],
    doc_md=__doc__,
):
    listed = S3ListOperator(task_id="list_inputs", bucket="{{ params.bucket }}", prefix="{{ params.prefix }}")

    @task
    def input_uris(keys: list[str], bucket: str, max_images: int) -> list[str]:
        """The ``s3://`` URIs of the listed images; refuses a run larger than ``max_images``."""
        uris = [f"s3://{bucket}/{key}" for key in keys if key.lower().endswith(IMAGE_SUFFIXES)]
        if len(uris) > int(max_images):
            raise ValueError(f"max_images: {len(uris)} images under the prefix, more than the {max_images} allowed")
        return uris

    uris = input_uris(listed.output, "{{ params.bucket }}", "{{ params.max_images }}")
    # One edit per image (retries reuse the request already paid for); at most 4 in flight.
    edits = FluxGenerateOperator.partial(
        task_id="edit",
        endpoint=KONTEXT_EDIT,
        prompt="{{ params.prompt }}",
        retries=2,
        max_active_tis_per_dag=4,
    ).expand(image_url=uris)
    FluxToS3Operator(
        task_id="to_s3",
        source=edits.output,
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="flux/edits/{{ run_id }}",
        retries=2,
    )
