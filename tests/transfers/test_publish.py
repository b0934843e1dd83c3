"""publish_images: approved staging images copied inside S3 (moto server), verified, manifest last."""

from __future__ import annotations

import hashlib
import json

import pytest

from airflow_flux.exceptions import FluxImageExistsError, FluxIntegrityError
from airflow_flux.manifest import Manifest, ManifestImage
from airflow_flux.manifest_store import merge_manifest
from airflow_flux.transfers import publish_images, read_manifest, review_images

STAGING = "review/staging/run1"
PUBLISHED = "review/published/run1"
RUN = {"dag_id": "review_dag", "run_id": "run1", "task_id": "publish"}


def _jpeg(n: int) -> bytes:
    return b"\xff\xd8\xff\xe0" + bytes([n]) * (2000 + n)


def _stage(s3, count: int = 3, *, skipped: bool = True) -> str:
    """Objects and a manifest as FluxToS3Operator wrote them before manifests were shared
    (version 1: the writer at the top level only); one NSFW-skipped entry between."""
    images = []
    for n in range(1, count + 1):
        key, data = f"{STAGING}/req{n}_0.jpg", _jpeg(n)
        s3.put_object(
            Bucket=s3.bucket,
            Key=key,
            Body=data,
            ContentType="image/jpeg",
            Metadata={"flux-request-id": f"req{n}"},
            ChecksumAlgorithm="SHA256",
        )
        images.append(
            {
                "status": "copied",
                "key": key,
                "s3_uri": f"s3://{s3.bucket}/{key}",
                "request_id": f"req{n}",
                "index": 0,
                "prompt": f"prompt {n}",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "content_type": "image/jpeg",
                "cost_usd": 0.04,
            }
        )
        if n == 1 and skipped:
            images.append({"status": "skipped", "reason": "nsfw", "key": f"{STAGING}/nsfw_0.jpg", "index": 0})
    manifest = {
        "version": 1,
        "created_at": "2026-12-01T00:00:00+00:00",
        "dag_id": "review_dag",
        "run_id": "run1",
        "task_id": "stage",
        "map_index": -1,
        "bucket": s3.bucket,
        "prefix": STAGING,
        "images": images,
    }
    s3.put_object(Bucket=s3.bucket, Key=f"{STAGING}/manifest.json", Body=json.dumps(manifest).encode())
    return f"s3://{s3.bucket}/{STAGING}/manifest.json"


def _keys(s3, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", []))


@pytest.fixture
def hook(s3):
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    return S3Hook(aws_conn_id="aws_default")


def test_approved_images_are_copied_verified_and_listed_the_rest_rejected(s3, hook):
    uri = _stage(s3)
    staged = review_images(read_manifest(hook, uri))
    assert [i.request_id for i in staged] == ["req1", "req2", "req3"]  # the skipped entry has no number

    result = publish_images(hook, uri, [3, 1], prefix=PUBLISHED, **RUN)

    assert _keys(s3, "review/published/") == [
        f"{PUBLISHED}/manifest.json",
        f"{PUBLISHED}/req1_0.jpg",
        f"{PUBLISHED}/req3_0.jpg",
    ]
    for n in (1, 3):
        obj = s3.get_object(Bucket=s3.bucket, Key=f"{PUBLISHED}/req{n}_0.jpg")
        assert obj["Body"].read() == _jpeg(n)
        assert obj["ContentType"] == "image/jpeg" and obj["Metadata"] == {"flux-request-id": f"req{n}"}
    assert [i.request_id for i in result.rejected] == ["req2"]
    assert result.withdrawn == []
    body = s3.get_object(Bucket=s3.bucket, Key=f"{PUBLISHED}/manifest.json")["Body"].read()
    manifest = Manifest.model_validate_json(body)
    assert result.manifest_uri == f"s3://{s3.bucket}/{PUBLISHED}/manifest.json"
    assert (manifest.dag_id, manifest.task_id, manifest.prefix, manifest.bucket) == (
        "review_dag",
        "publish",
        PUBLISHED,
        s3.bucket,
    )
    assert [(i.request_id, i.status.value, i.key) for i in manifest.images] == [
        ("req1", "copied", f"{PUBLISHED}/req1_0.jpg"),
        ("req3", "copied", f"{PUBLISHED}/req3_0.jpg"),
    ]
    assert manifest.images[0].sha256 == staged[0].sha256 and manifest.images[0].prompt == "prompt 1"
    assert manifest.images[0].s3_uri == f"s3://{s3.bucket}/{PUBLISHED}/req1_0.jpg"
    assert manifest.cost_usd == pytest.approx(0.08)


def test_a_retry_reuses_and_a_new_answer_withdraws_what_it_rejects(s3, hook):
    uri = _stage(s3)
    publish_images(hook, uri, [1, 2], prefix=PUBLISHED, **RUN)
    again = publish_images(hook, uri, [1, 2], prefix=PUBLISHED, **RUN)
    assert [i.status.value for i in again.published] == ["reused", "reused"]

    # The review was cleared and answered anew: image 2 is no longer approved.
    anew = publish_images(hook, uri, [1], prefix=PUBLISHED, **RUN)
    assert anew.withdrawn == [f"{PUBLISHED}/req2_0.jpg"]
    assert _keys(s3, PUBLISHED) == [f"{PUBLISHED}/manifest.json", f"{PUBLISHED}/req1_0.jpg"]
    assert [i.request_id for i in read_manifest(hook, anew.manifest_uri).images] == ["req1"]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sent(hook, operation: str) -> list[dict[str, str]]:
    """The headers of every ``operation`` request the hook's client sends from now on."""
    sent: list[dict[str, str]] = []
    hook.get_conn().meta.events.register(
        f"before-send.s3.{operation}",
        lambda request, **_: sent.append({k.lower(): _text(v) for k, v in request.headers.items()}),
    )
    return sent


def _body(s3, key: str) -> bytes:
    return s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def test_a_staging_object_replaced_after_the_review_publishes_nothing_and_deletes_nothing(s3, hook):
    uri = _stage(s3)
    there_before = f"{PUBLISHED}/req1_0.jpg"
    s3.put_object(Bucket=s3.bucket, Key=there_before, Body=b"there before", ChecksumAlgorithm="SHA256")
    s3.put_object(Bucket=s3.bucket, Key=f"{STAGING}/req2_0.jpg", Body=_jpeg(9), ChecksumAlgorithm="SHA256")
    copies = _sent(hook, "CopyObject")
    with pytest.raises(FluxIntegrityError, match=r"req2_0\.jpg is not the image that was reviewed.*Nothing was"):
        publish_images(hook, uri, [1, 2], prefix=PUBLISHED, replace=True, **RUN)
    # Checked before the first copy: nothing copied, the object that was there is as it was.
    assert copies == []
    assert _keys(s3, PUBLISHED) == [there_before]
    assert _body(s3, there_before) == b"there before"


def test_each_copy_is_of_the_checked_object_and_verified_after(s3, hook):
    """moto ignores CopySourceIfMatch, so a source replaced between its check and its copy is
    copied there: the copy's own SHA-256 catches it, and only the publish's own copies go."""
    uri = _stage(s3)
    there_before = f"{PUBLISHED}/req3_0.jpg"
    s3.put_object(Bucket=s3.bucket, Key=there_before, Body=b"there before", ChecksumAlgorithm="SHA256")
    checked = {n: s3.head_object(Bucket=s3.bucket, Key=f"{STAGING}/req{n}_0.jpg")["ETag"] for n in (1, 2, 3)}
    copies = _sent(hook, "CopyObject")

    def replace_image_2(params, **_):
        if params["Key"].endswith("req2_0.jpg"):  # after every check, before this copy
            s3.put_object(Bucket=s3.bucket, Key=f"{STAGING}/req2_0.jpg", Body=_jpeg(9), ChecksumAlgorithm="SHA256")

    hook.get_conn().meta.events.register("before-parameter-build.s3.CopyObject", replace_image_2)
    with pytest.raises(FluxIntegrityError, match=r"req2_0\.jpg is not the image that was reviewed: its copy's"):
        publish_images(hook, uri, [1, 2, 3], prefix=PUBLISHED, replace=True, **RUN)

    # The precondition S3 itself enforces: the very object checked (its ETag), onto a key still free.
    assert [(c["x-amz-copy-source-if-match"], c.get("if-none-match")) for c in copies] == [
        (checked[1], "*"),
        (checked[2], "*"),
    ]
    # The new keys' copies are deleted; the overwrite comes last and was never reached.
    assert _keys(s3, PUBLISHED) == [there_before]
    assert _body(s3, there_before) == b"there before"


@pytest.mark.parametrize("failing", ["copy", "manifest"])
def test_a_failure_mid_publish_with_replace_deletes_only_what_it_created(s3, hook, caplog, failing):
    from botocore.exceptions import ClientError

    uri = _stage(s3)
    there_before = f"{PUBLISHED}/req1_0.jpg"
    s3.put_object(Bucket=s3.bucket, Key=there_before, Body=b"there before", ChecksumAlgorithm="SHA256")
    etag_before = s3.head_object(Bucket=s3.bucket, Key=there_before)["ETag"]
    copies = _sent(hook, "CopyObject")
    calls = {"n": 0}

    def fail(**_):
        calls["n"] += 1
        if failing == "manifest" or calls["n"] == 2:
            raise ClientError({"Error": {"Code": "InternalError", "Message": "injected"}}, failing)

    # The second copy (of a new key), or the manifest's write (after every copy, the overwrite last).
    event = "before-call.s3.CopyObject" if failing == "copy" else "before-call.s3.PutObject"
    hook.get_conn().meta.events.register(event, fail)
    with pytest.raises(ClientError, match="injected"):
        publish_images(hook, uri, [1, 2, 3], prefix=PUBLISHED, replace=True, **RUN)

    # The object that was there before is never deleted: untouched if the failure came first...
    assert _keys(s3, PUBLISHED) == [there_before]
    if failing == "copy":
        assert _body(s3, there_before) == b"there before"
        return
    # ... and, overwritten (If-Match the object looked at) before a later failure, reported.
    assert copies[-1]["if-match"] == etag_before and "if-none-match" not in copies[-1]
    assert _body(s3, there_before) == _jpeg(1)
    assert f"left as they are: s3://{s3.bucket}/{there_before}" in caplog.text


def test_a_replaced_object_is_reported(s3, hook):
    uri = _stage(s3)
    s3.put_object(Bucket=s3.bucket, Key=f"{PUBLISHED}/req2_0.jpg", Body=b"there before", ChecksumAlgorithm="SHA256")
    result = publish_images(hook, uri, [1, 2], prefix=PUBLISHED, replace=True, **RUN)
    assert result.replaced == [f"{PUBLISHED}/req2_0.jpg"]
    assert _body(s3, f"{PUBLISHED}/req2_0.jpg") == _jpeg(2)


def test_images_of_every_task_that_copied_into_the_staging_prefix_are_numbered(s3, hook):
    """A version-1 staging manifest, then a second copy task of the run merged its image in."""
    uri = _stage(s3)
    key, data = f"{STAGING}/req4_0.jpg", _jpeg(4)
    s3.put_object(Bucket=s3.bucket, Key=key, Body=data, ChecksumAlgorithm="SHA256")
    image = ManifestImage(status="copied", key=key, index=0, request_id="req4", sha256=hashlib.sha256(data).hexdigest())
    part = Manifest(
        created_at="2026-12-01T00:01:00+00:00",
        **{**RUN, "task_id": "stage_more"},
        map_index=-1,
        bucket=s3.bucket,
        prefix=STAGING,
        images=[image],
    )
    merge_manifest(s3, part, f"{STAGING}/manifest.json")

    staged = review_images(read_manifest(hook, uri))
    assert [(i.request_id, i.task_id) for i in staged] == [
        ("req1", "stage"),
        ("req2", "stage"),
        ("req3", "stage"),
        ("req4", "stage_more"),
    ]
    result = publish_images(hook, uri, [1, 4], prefix=PUBLISHED, **RUN)
    assert [(i.request_id, i.task_id) for i in result.published] == [("req1", "publish"), ("req4", "publish")]
    manifest = read_manifest(hook, result.manifest_uri)
    assert [i.key for i in manifest.images] == [f"{PUBLISHED}/req1_0.jpg", f"{PUBLISHED}/req4_0.jpg"]
    assert [(i.task_id, i.run_id) for i in manifest.images] == [("publish", "run1")] * 2


def test_a_new_answer_withdraws_nothing_another_publish_still_lists(s3, hook):
    uri = _stage(s3)
    shared = "review/published/shared"
    run2 = {**RUN, "run_id": "run2"}
    publish_images(hook, uri, [1], prefix=shared, **RUN)
    again = publish_images(hook, uri, [1, 2], prefix=shared, **run2)
    assert [i.status.value for i in again.published] == ["reused", "copied"]
    # run2's review is answered anew without image 1, which run1 published and still lists.
    anew = publish_images(hook, uri, [2], prefix=shared, **run2)
    assert anew.withdrawn == []
    assert _keys(s3, shared) == [f"{shared}/manifest.json", f"{shared}/req1_0.jpg", f"{shared}/req2_0.jpg"]
    manifest = read_manifest(hook, anew.manifest_uri)
    assert [(i.run_id, i.request_id) for i in manifest.images] == [("run1", "req1"), ("run2", "req2")]


def test_other_bytes_at_a_published_key_fail_before_anything_is_written(s3, hook):
    uri = _stage(s3)
    s3.put_object(Bucket=s3.bucket, Key=f"{PUBLISHED}/req3_0.jpg", Body=b"someone else's", ChecksumAlgorithm="SHA256")
    with pytest.raises(FluxImageExistsError, match=r"req3_0\.jpg"):
        publish_images(hook, uri, [1, 3], prefix=PUBLISHED, **RUN)
    assert _keys(s3, PUBLISHED) == [f"{PUBLISHED}/req3_0.jpg"]
    replaced = publish_images(hook, uri, [1, 3], prefix=PUBLISHED, replace=True, **RUN)
    assert [i.status.value for i in replaced.published] == ["copied", "copied"]
    assert s3.get_object(Bucket=s3.bucket, Key=f"{PUBLISHED}/req3_0.jpg")["Body"].read() == _jpeg(3)


def test_nothing_approved_writes_an_empty_manifest(s3, hook):
    uri = _stage(s3, count=2, skipped=False)
    result = publish_images(hook, uri, [], prefix=PUBLISHED, **RUN)
    assert _keys(s3, PUBLISHED) == [f"{PUBLISHED}/manifest.json"]
    assert read_manifest(hook, result.manifest_uri).images == []
    assert len(result.rejected) == 2


def test_bad_numbers_and_the_staging_prefix_itself_are_refused(s3, hook):
    uri = _stage(s3)
    with pytest.raises(ValueError, match=r"\[0, 4\] not in the staging manifest \(1 to 3\)"):
        publish_images(hook, uri, [0, 1, 4], prefix=PUBLISHED, **RUN)
    with pytest.raises(ValueError, match="is the staging prefix"):
        publish_images(hook, uri, [1], prefix=f"/{STAGING}/", **RUN)
    assert _keys(s3, "review/published/") == []
