"""Product shots with FLUX.2 [pro]: one product's reference images in S3, a scene per prompt.

"The new bottle and its label, on a marble counter, on a beach, in a snowy window." Each
scene is one ``fal-ai/flux-2-pro/edit`` request (FLUX.2 [pro] makes one image a request)
with the same references, ``s3://`` URIs the operator hands fal as presigned GET URLs (the
bucket stays private; the URLs are never logged or stored), at the size the shop needs
(``image_size``: a preset or ``{"width": W, "height": H}``). ``FluxToS3Operator`` copies
the shots with a manifest that lists each shot's references and what it cost: FLUX.2 is
priced per megapixel, the references' included, so a larger shot costs more.

Trigger it with the bucket, the references and the scenes
(``airflow dags trigger flux2_product_shots -c '{"bucket": "shop", "references": ["s3://shop/products/bottle.png",
"s3://shop/products/label.png"], "scenes": ["on a marble counter", "on a beach at dawn"]}'``).
Connections: ``flux_default`` and ``aws_default``. ``max_images=20`` refuses a run that
would make more shots than that, before anything is paid for.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, Param

from airflow_flux.families.flux2 import FLUX2_PRO_EDIT
from airflow_flux.operators import FluxBatchGenerateOperator
from airflow_flux.transfers import FluxToS3Operator

with DAG(
    dag_id="flux2_product_shots",
    description="Reference images in S3 -> FLUX.2 [pro] edits, one per scene -> S3",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params={
        "bucket": Param("flux-images", type="string", minLength=3),
        "references": Param(
            ["s3://flux-images/products/bottle.png", "s3://flux-images/products/label.png"],
            type="array",
            minItems=1,
            maxItems=8,
        ),
        "scenes": Param(
            [
                "the bottle with this label on a white marble counter, soft window light, product photo",
                "the bottle with this label on wet sand at dawn, shallow depth of field",
            ],
            type="array",
            minItems=1,
        ),
        "image_size": Param({"width": 1024, "height": 1024}, type=["object", "string"]),
    },
    render_template_as_native_obj=True,
    tags=["flux", "flux2", "example"],
    doc_md=__doc__,
):
    shots = FluxBatchGenerateOperator(
        task_id="shots",
        endpoint=FLUX2_PRO_EDIT,
        requests="{{ params.scenes }}",
        image_urls="{{ params.references }}",
        image_size="{{ params.image_size }}",
        output_format="png",
        max_images=20,
        retries=2,
    )
    FluxToS3Operator(
        task_id="to_s3",
        source=shots.output,
        s3_bucket="{{ params.bucket }}",
        s3_key_prefix="flux/product-shots/{{ run_id }}",
        retries=2,
    )
