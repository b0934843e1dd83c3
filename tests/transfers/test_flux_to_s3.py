"""FluxToS3Operator against the emulator (CDN) and a moto S3 server, both over real sockets."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
from PIL import Image

from airflow_flux.emulator import Scenario
from airflow_flux.transfers.flux_to_s3 import sniff_content_type
from tests.helpers import task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


def _objects(s3, prefix: str = "") -> dict[str, dict]:
    listing = s3.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o for o in listing}


def _manifest(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read())


def _run(dags, dag_id: str, **params):
    # Every param given explicitly: dag.test() may keep an earlier run's conf in the DAG's params.
    defaults = {
        "num_images": 1,
        "sync_mode": False,
        "nsfw": "skip",
        "prefix": "",
        "key_template": "{request_id}_{index}.{ext}",
        "aspect_ratio": "1:1",
    }
    return dags.get_dag(dag_id).test(run_conf={**defaults, **params})


def test_sensor_result_to_s3_with_metadata_checksum_and_manifest(dags, flux_default, s3):
    dr = _run(dags, "flux_test_to_s3", prompt="two foxes", num_images=2, bucket=s3.bucket, prefix="run1")
    assert dr.state == "success", task_states(dr)

    uris = xcom(dr, "to_s3")
    objects = _objects(s3, "run1/")
    assert sorted(objects) == sorted([u.split("/", 3)[3] for u in uris] + ["run1/manifest.json"])
    assert len(uris) == 2
    manifest = _manifest(s3, "run1/manifest.json")
    assert manifest["bucket"] == s3.bucket
    assert [i["s3_uri"] for i in manifest["images"]] == uris
    result = xcom(dr, "wait")

    for entry in manifest["images"]:
        key = entry["key"]
        obj = s3.get_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
        body = obj["Body"].read()
        picture = Image.open(io.BytesIO(body))
        picture.load()
        assert (picture.format, picture.size) == ("JPEG", (1024, 1024))
        digest = hashlib.sha256(body).hexdigest()
        assert entry["sha256"] == digest
        assert entry["size"] == len(body) == obj["ContentLength"]
        assert base64.b64decode(obj["ChecksumSHA256"]).hex() == digest, "S3's own checksum of the object"
        assert obj["ContentType"] == "image/jpeg"
        meta = obj["Metadata"]
        assert meta["flux-request-id"] == result["request_id"] == entry["request_id"]
        assert meta["flux-seed"] == str(result["seed"])
        assert meta["flux-sha256"] == digest
        assert meta["flux-prompt"] == "two foxes"
        assert meta["flux-prompt-sha256"] == hashlib.sha256(b"two foxes").hexdigest()
        assert (meta["flux-width"], meta["flux-height"], meta["flux-nsfw"]) == ("1024", "1024", "false")
        assert meta["flux-endpoint"] == "fal-ai/flux-pro/kontext/text-to-image"
        assert (entry["prompt"], entry["seed"], entry["nsfw"], entry["status"]) == (
            "two foxes",
            result["seed"],
            False,
            "copied",
        )
        assert entry["timings"] == result["timings"]

    # The sensor's result was used: no second result call. The CDN never saw the token.
    assert len(flux_default.calls(kind="result")) == 1
    cdn = flux_default.calls(kind="cdn")
    assert len(cdn) == 2
    assert all(c.authorization is None for c in cdn)
    # Nothing left half-done on the S3 side.
    assert not s3.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def test_handle_only_path_fetches_the_result(dags, flux_default, s3):
    dr = _run(dags, "flux_test_handle_to_s3", prompt="a handle fox", bucket=s3.bucket)
    assert dr.state == "success", task_states(dr)
    (uri,) = xcom(dr, "to_s3")
    assert uri.startswith(f"s3://{s3.bucket}/flux/flux_test_handle_to_s3/")
    assert len(flux_default.calls(kind="result")) == 2  # the sensor's, and the transfer's own


def test_batch_from_a_mapped_upstream_in_one_task(dags, flux_default, s3):
    dr = _run(dags, "flux_test_batch_to_s3", bucket=s3.bucket)
    assert dr.state == "success", task_states(dr)
    uris = xcom(dr, "to_s3")
    assert len(uris) == 3
    (manifest_key,) = [k for k in _objects(s3) if k.endswith("manifest.json")]
    manifest = _manifest(s3, manifest_key)
    assert sorted(i["prompt"] for i in manifest["images"]) == ["batch one", "batch three", "batch two"]


@pytest.mark.parametrize(
    ("policy", "state", "copied", "skipped"),
    [("skip", "success", 1, 1), ("keep", "success", 2, 0), ("fail", "failed", 0, 0)],
)
def test_nsfw_policy(dags, flux_default, s3, capfd, policy, state, copied, skipped):
    flux_default.add_scenario(Scenario(nsfw=[True, False]), match="spicy")
    dr = _run(dags, "flux_test_to_s3", prompt="spicy fox", num_images=2, bucket=s3.bucket, nsfw=policy, prefix=policy)
    assert dr.state == state
    images = [k for k in _objects(s3, f"{policy}/") if not k.endswith("manifest.json")]
    assert len(images) == copied
    if policy == "fail":
        assert _objects(s3) == {}
        assert "flagged NSFW by the API and nsfw_policy='fail'" in capfd.readouterr().out
        return
    manifest = _manifest(s3, f"{policy}/manifest.json")
    statuses = [(i["index"], i["nsfw"], i["status"]) for i in manifest["images"]]
    assert statuses == [(0, True, "skipped" if policy == "skip" else "copied"), (1, False, "copied")]
    assert sum(i["status"] == "skipped" for i in manifest["images"]) == skipped
    if policy == "keep":
        head = s3.head_object(Bucket=s3.bucket, Key=manifest["images"][0]["key"])
        assert head["Metadata"]["flux-nsfw"] == "true"


def test_data_uri_images_are_decoded_and_uploaded(dags, flux_default, s3):
    dr = _run(dags, "flux_test_to_s3", prompt="inline fox", sync_mode=True, bucket=s3.bucket, prefix="inline")
    assert dr.state == "success", task_states(dr)
    assert xcom(dr, "wait")["images"][0]["url"].startswith("data:image/jpeg;base64,")
    manifest = _manifest(s3, "inline/manifest.json")
    (entry,) = manifest["images"]
    assert entry["source_url"] is None
    body = s3.get_object(Bucket=s3.bucket, Key=entry["key"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == entry["sha256"]
    assert sniff_content_type(body[:16]) == "image/jpeg"
    assert flux_default.calls(kind="cdn") == []


def test_replace_false_refuses_an_existing_key_and_changes_nothing(dags, flux_default, s3, capfd):
    params = {"bucket": s3.bucket, "prefix": "fixed", "key_template": "image_{index}.{ext}"}
    assert _run(dags, "flux_test_to_s3", prompt="first fox", **params).state == "success"
    before = {k: (o["ETag"], o["LastModified"]) for k, o in _objects(s3).items()}
    capfd.readouterr()

    dr = _run(dags, "flux_test_to_s3", prompt="second fox", **params)
    assert dr.state == "failed"
    assert task_states(dr)["to_s3"] == "failed"
    out = capfd.readouterr().out
    assert "Refusing to overwrite existing object(s)" in out
    assert "fixed/image_0.jpg" in out
    after = {k: (o["ETag"], o["LastModified"]) for k, o in _objects(s3).items()}
    assert after == before


def test_broken_download_leaves_no_object(dags, flux_default, s3, capfd):
    flux_default.add_scenario(Scenario(cdn_break_after=2000), match="broken download")
    dr = _run(dags, "flux_test_to_s3", prompt="broken download fox", num_images=2, bucket=s3.bucket, prefix="broken")
    out = capfd.readouterr().out
    assert dr.state == "failed"
    assert task_states(dr)["to_s3"] == "failed"
    assert "Image download" in out
    assert _objects(s3) == {}
    assert not s3.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")
    # Each image was tried again (transient) before giving up.
    assert len(flux_default.calls(kind="cdn")) > 2
