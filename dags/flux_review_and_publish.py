"""Review before publishing: images wait under a *staging* prefix until a person picks the ones to publish.

    load_prompts ─> generate[i] ─> stage ─> review_request ─> review ─> publish
                    (mapped,       (copy to  (the choices     (a person  (S3-to-S3 copy of the
                     deferred)     staging)   and the page)    picks)     picked ones + manifest)

* Every prompt is generated once (submit and deferred wait in one mapped task) and copied
  to ``s3://<bucket>/<staging_prefix>/<run_id>/`` with its ``manifest.json``.
* ``review`` is a human-in-the-loop task (Airflow's standard provider): the run's
  *Required actions* page shows every staged image (thumbnails from the Flux gallery) and
  one choice per image; the task waits, holding no worker slot, until someone answers in
  the UI or through the REST API (README, "Review before publishing").
* ``publish`` copies the picked images inside S3, from the staging manifest's entries
  (nothing is generated or downloaded again), checks each copy's SHA-256 against it, and
  writes ``<published_prefix>/<run_id>/manifest.json`` last, listing the published images
  only. The images that were not picked stay in staging; the task's return value and log
  list them.

Connections: ``flux_default`` (the API; the ``flux_conn_id`` param picks another) and
``aws_default`` (S3). Bucket: the ``bucket`` param, else the Airflow Variable
``flux_s3_bucket`` (default ``flux-images``), read when the task runs.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pendulum
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import DAG, Param, XComArg, task

from airflow_flux.operators import FluxGenerateOperator
from airflow_flux.transfers import FluxToS3Operator
from airflow_flux.xcom_keys import MANIFEST_XCOM_KEY

#: A reviewer looks at every image: keep a run to what one person can judge at once.
MAX_PROMPTS = 20
S3_BUCKET = "{{ params.bucket or var.value.get('flux_s3_bucket', 'flux-images') }}"
#: The choice that publishes nothing (an answer needs at least one choice).
PUBLISH_NONE = "0: none, publish nothing"
#: How long the review may wait; then the task fails and nothing is published.
REVIEW_TIMEOUT = timedelta(days=3)


class ImageReviewOperator(HITLOperator):
    """``HITLOperator`` whose options are templated: one per staged image, known at run time only."""

    # Resolved from review_request's XCom when the task starts and again when the answer
    # resumes it, so the answer is checked against the very options that were offered.
    template_fields = (*HITLOperator.template_fields, "options")


def image_label(number: int, prompt: str | None) -> str:
    """The choice of one image: its number, then the start of its prompt (one line)."""
    text = " ".join((prompt or "(no prompt)").split())
    return f"{number}: {text[:70] + '…' if len(text) > 70 else text}"


def chosen_numbers(chosen_options: list[str]) -> list[int]:
    """The image numbers of an answer (``"3: a fox…"`` -> 3); none for :data:`PUBLISH_NONE`."""
    numbers = sorted({int(option.split(":", 1)[0]) for option in chosen_options})
    if 0 in numbers and len(numbers) > 1:
        # Contradictory: publish nothing rather than guess. Clear "review" to answer again.
        raise ValueError(f"The answer picks images and {PUBLISH_NONE!r}: {chosen_options}")
    return [n for n in numbers if n]


def _md(text: str) -> str:
    """Plain text in Markdown (prompts are user input: no links, emphasis or HTML of their own)."""
    return re.sub(r"([\\`*_\[\]<>|#~!])", r"\\\1", text)


with DAG(
    dag_id="flux_review_and_publish",
    description="Prompts -> FLUX.1 Kontext [pro] -> staging in S3 -> a person picks -> published with a manifest",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    params={
        "prompts": Param(
            [
                "a lighthouse on a basalt cliff during a storm",
                "a red fox curled up asleep in fresh snow at dawn",
                "a paper boat on a rain puddle, city lights reflected",
            ],
            type="array",
            items={"type": "string"},
            minItems=1,
            maxItems=MAX_PROMPTS,
            description="One image per prompt; each is reviewed before it is published.",
        ),
        "bucket": Param("", type="string", description="Empty: the Variable flux_s3_bucket (default flux-images)"),
        "staging_prefix": Param("flux/review/staging", type="string", minLength=1),
        "published_prefix": Param("flux/review/published", type="string", minLength=1),
        "flux_conn_id": Param("flux_default", type="string", minLength=1, description="The API account that pays"),
    },
    tags=["flux", "example", "human-in-the-loop"],
    doc_md=__doc__,
):

    @task
    def load_prompts(**context: Any) -> list[str]:
        """The run's prompts, blank ones dropped."""
        prompts = [" ".join(str(p).split()) for p in context["params"]["prompts"]]
        prompts = [p for p in prompts if p]
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"{len(prompts)} prompt(s): give 1 to MAX_PROMPTS={MAX_PROMPTS}")
        return prompts

    generate = FluxGenerateOperator.partial(
        task_id="generate",
        flux_conn_id="{{ params.flux_conn_id }}",
        aspect_ratio="1:1",
        wait_timeout=30 * 60,  # then the request is cancelled and the task fails
        max_active_tis_per_dag=4,  # requests of this DAG in flight at the API, at most
        map_index_template="{{ task.prompt | truncate(60) }}",
    ).expand(prompt=load_prompts())

    # The whole batch in one copy, with its manifest: what the reviewer sees, and what
    # publish copies from. The gallery finds it through the XCom the copy pushes.
    stage = FluxToS3Operator(
        task_id="stage",
        source=generate.output,
        s3_bucket=S3_BUCKET,
        s3_key_prefix="{{ params.staging_prefix.strip('/') }}/{{ run_id }}",
    )
    staging_manifest = XComArg(stage, key=MANIFEST_XCOM_KEY)

    @task(multiple_outputs=True)
    def review_request(manifest_uri: str, **context: Any) -> dict[str, Any]:
        """The review's choices (one per staged image) and its page (Markdown, with thumbnails)."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook
        from airflow.providers.common.compat.sdk import AirflowSkipException

        from airflow_flux.links import gallery_image_path, gallery_path
        from airflow_flux.transfers import read_manifest, review_images

        manifest = read_manifest(S3Hook(), manifest_uri)
        staged = review_images(manifest)
        if not staged:
            raise AirflowSkipException("No image to review: every request failed or was skipped (NSFW)")
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        published = f"{context['params']['published_prefix'].strip('/')}/{run_id}"
        lines = [
            f"**{len(staged)} image(s)** wait in `s3://{manifest.bucket}/{manifest.prefix}/`. Pick the ones to "
            f"publish to `s3://{manifest.bucket}/{published}/`; the others stay in staging, unpublished. "
            f"[All of them in the Flux gallery]({gallery_path(dag_id, run_id, task_id='stage')})",
        ]
        for number, image in enumerate(staged, start=1):
            # The gallery serves each image of a run's manifests by its SHA-256, behind Airflow's
            # login (no presigned URL ends up in the metadata DB, where this page is kept); the
            # thumbnail opens the gallery's page of the image, at full size with its details.
            image_path = gallery_image_path(dag_id, run_id, image.sha256, page=False)
            request = gallery_path(dag_id, run_id, task_id="stage", request_id=image.request_id)
            lines += [
                f"### {number}. {_md(image.prompt or '(no prompt)')}",
                f"[![image {number}]({image_path}?size=thumb)]({gallery_image_path(dag_id, run_id, image.sha256)})",
                f"{image.width}x{image.height}, seed {image.seed} · [in the gallery]({request}) · `{image.key}`",
            ]
        return {
            "options": [image_label(n, i.prompt) for n, i in enumerate(staged, start=1)] + [PUBLISH_NONE],
            "body": "\n\n".join(lines),
        }

    request = review_request(staging_manifest)

    # One choice per image, several allowed. The UI shows them as a multi-select list of
    # "3: a lighthouse on…" next to the thumbnails, and the API refuses any choice that was
    # not offered; a free-text "numbers to reject" field would be neither labelled nor
    # checked. An image is published only if someone picked it: forgetting one fails safe.
    review = ImageReviewOperator(
        task_id="review",
        subject="Publish which images of {{ run_id }}?",
        options=request["options"],
        body=request["body"],
        multiple=True,
        response_timeout=REVIEW_TIMEOUT,
        retries=0,  # a retry would ask again; a timeout should just end the run
    )

    @task
    def publish(answer: dict[str, Any], manifest_uri: str, **context: Any) -> dict[str, Any]:
        """Copy the picked images inside S3 and write their manifest; list the others."""
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from airflow_flux.transfers import publish_images

        ti = context["ti"]
        numbers = chosen_numbers(answer["chosen_options"])
        who = (answer.get("responded_by_user") or {}).get("name", "someone")
        print(f"{who} picked image(s) {numbers or 'none'}")
        result = publish_images(
            S3Hook(),
            manifest_uri,
            numbers,
            prefix=f"{context['params']['published_prefix'].strip('/')}/{context['run_id']}",
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            map_index=ti.map_index,
        )
        # The gallery lists the published images too (it finds manifests through this XCom).
        ti.xcom_push(key=MANIFEST_XCOM_KEY, value=result.manifest_uri)
        rejected = [{"prompt": i.prompt, "staging_uri": i.s3_uri} for i in result.rejected]
        for image in rejected:
            print(f"Not published (rejected): {image['staging_uri']}  {image['prompt']!r}")
        print(f"Published {len(result.published)} image(s); manifest {result.manifest_uri}")
        return {
            "manifest": result.manifest_uri,
            "published": [i.s3_uri for i in result.published],
            "rejected": rejected,
            "withdrawn": result.withdrawn,
        }

    publish(review.output, staging_manifest)
