"""FLUX.2 through the operators: the emulator (real sockets) and moto S3, the example DAG run."""

from __future__ import annotations

import json

import pytest

from airflow_flux.exceptions import FluxValidationError
from airflow_flux.families.flux2 import FLUX2_PRO, FLUX2_PRO_EDIT
from airflow_flux.operators import FluxBatchGenerateOperator, FluxGenerateOperator, FluxSubmitOperator
from tests.helpers import TOKEN, task_states, xcom
from tests.operators.test_kontext import SIGNATURE, _context, _png

pytestmark = pytest.mark.usefixtures("airflow_db")


@pytest.mark.parametrize(
    ("image_size", "pixels", "cost", "billed"),
    [
        ("square_hd", (1024, 1024), 0.03, 1),
        ({"width": 2048, "height": 2048}, (2048, 2048), 0.03 + 3 * 0.015, 4),
    ],
)
def test_pro_sends_image_size_as_given_and_costs_by_the_real_output(
    emulator, flux_conn, image_size, pixels, cost, billed
):
    op = FluxGenerateOperator(
        task_id="g",
        prompt="a bottle",
        endpoint=FLUX2_PRO,
        image_size=image_size,
        flux_conn_id=flux_conn,
        deferrable=False,
    )
    result = op._wait_blocking(op.submit(_context()))
    (job,) = emulator.jobs.values()
    assert job.input == {"prompt": "a bottle", "image_size": image_size}  # nothing Kontext-only sent
    ((width, height),) = {(i["width"], i["height"]) for i in result["images"]}
    assert (width, height) == pixels
    assert result["cost_usd"] == pytest.approx(cost)
    assert result["billable_units"] == billed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": "huge"}, r"image_size: must be one of 'square_hd'"),
        ({"image_size": {"width": 0, "height": 1024}}, r"image_size: must be .*whole numbers from 1 to 14142"),
        ({"num_images": 2}, r"num_images: fal-ai/flux-2-pro makes one image a request"),
        ({"aspect_ratio": "1:1"}, r"aspect_ratio: unknown field for endpoint fal-ai/flux-2-pro"),
        ({"endpoint": FLUX2_PRO_EDIT, "image_urls": [f"s3://b/{i}.png" for i in range(11)]}, r"image_urls: .*1 to 10"),
    ],
)
def test_bad_values_are_refused_when_the_dag_is_parsed_naming_the_field(emulator, kwargs, message):
    kwargs = {"endpoint": FLUX2_PRO, **kwargs}
    with pytest.raises(FluxValidationError, match=message):
        FluxSubmitOperator(task_id="bad", prompt="a bottle", **kwargs)
    assert emulator.requests == []


def test_a_batch_item_with_a_bad_size_is_refused_before_any_call(emulator, flux_conn):
    op = FluxBatchGenerateOperator(
        task_id="b",
        endpoint=FLUX2_PRO,
        requests=["a bottle", {"prompt": "a jar", "image_size": {"width": 0, "height": 1024}}],
        flux_conn_id=flux_conn,
    )
    with pytest.raises(FluxValidationError, match=r"requests\[1\]: .*image_size: must be"):
        op.execute(_context())
    assert emulator.requests == []


def test_the_product_shots_example_edits_from_two_s3_references(dags, flux_default, s3):
    # Two private references in S3, two scenes: fal's side fetches both references of each
    # request through presigned URLs, without credentials; what is recorded names the
    # s3:// inputs, never a presigned URL; every shot's cost is known (megapixels billed).
    for name, colour in (("bottle", (220, 20, 20)), ("label", (20, 20, 220))):
        s3.put_object(Bucket=s3.bucket, Key=f"products/{name}.png", Body=_png(colour), ContentType="image/png")
    refs = [f"s3://{s3.bucket}/products/bottle.png", f"s3://{s3.bucket}/products/label.png"]
    dr = dags.get_dag("flux2_product_shots").test(
        run_conf={"bucket": s3.bucket, "references": refs, "scenes": ["on marble", "on sand"]}
    )
    assert dr.state == "success", task_states(dr)

    jobs = list(flux_default.jobs.values())
    assert len(jobs) == 2 and {j.model_path for j in jobs} == {FLUX2_PRO_EDIT}
    for job in jobs:
        assert job.input["image_size"] == {"width": 1024, "height": 1024}
        sent = job.input["image_urls"]
        assert [u.split("?")[0] for u in sent] == [
            r.replace(f"s3://{s3.bucket}", f"{s3.meta.endpoint_url}/{s3.bucket}") for r in refs
        ]
        assert all(SIGNATURE in u for u in sent)
        assert len(job.input_fetches) == 2
        assert all(f.ok and not f.authorization_sent for f in job.input_fetches)

    copy = xcom(dr, "to_s3")
    manifest = json.loads(
        s3.get_object(Bucket=s3.bucket, Key=f"flux/product-shots/{dr.run_id}/manifest.json")["Body"].read()
    )
    assert len(manifest["images"]) == 2 and copy
    for entry in manifest["images"]:
        assert [i.split("?")[0] for i in entry["inputs"]] == refs  # pinned s3:// URIs
        assert (entry["width"], entry["height"]) == (1024, 1024)
        # 1 MP out and two references of 1 MP each (64x48, rounded up): $0.03 + 2 x $0.015.
        assert entry["cost_usd"] == pytest.approx(0.06)
    assert manifest["cost_usd"] == pytest.approx(0.12)
    recorded = json.dumps([manifest, xcom(dr, "shots"), copy])
    assert SIGNATURE not in recorded and TOKEN not in recorded


def test_a_batch_fans_out_num_images_into_one_request_per_image(emulator, flux_conn):
    # [pro] makes one image a request: an item asking 3 is 3 requests, the seed stepped so the
    # images differ; the shared num_images applies to the items that do not say theirs.
    op = FluxBatchGenerateOperator(
        task_id="b",
        endpoint=FLUX2_PRO,
        requests=["a bottle", {"prompt": "a jar", "num_images": 3, "seed": 10}],
        num_images=2,
        image_size="square_hd",
        flux_conn_id=flux_conn,
        poll_interval=0.05,
        deferrable=False,
    )
    results = op.execute(_context())
    assert [(r["index"], r["prompt"], r["status"]) for r in results] == [
        (0, "a bottle", "completed"),
        (1, "a bottle", "completed"),
        (2, "a jar", "completed"),
        (3, "a jar", "completed"),
        (4, "a jar", "completed"),
    ]
    sent = [emulator.jobs[r["request_id"]].input for r in results]
    assert all("num_images" not in body and body["image_size"] == "square_hd" for body in sent)
    assert [body.get("seed") for body in sent] == [None, None, 10, 11, 12]
    assert all(len(r["images"]) == 1 and r["cost_usd"] == pytest.approx(0.03) for r in results)


def test_a_fanned_out_batch_past_max_images_is_refused_before_any_call(emulator, flux_conn):
    op = FluxBatchGenerateOperator(
        task_id="b", endpoint=FLUX2_PRO, requests=["a", "b"], num_images=300, flux_conn_id=flux_conn
    )
    with pytest.raises(FluxValidationError, match=r"max_images: the batch of 2 request\(s\) would generate 600 images"):
        op.execute(_context())
    bad = FluxBatchGenerateOperator(
        task_id="b", endpoint=FLUX2_PRO, requests=["a", {"prompt": "b", "num_images": "many"}], flux_conn_id=flux_conn
    )
    with pytest.raises(FluxValidationError, match=r"requests\[1\]: num_images: must be a whole number"):
        bad.execute(_context())
    assert emulator.requests == []
