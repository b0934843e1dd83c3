"""The gallery's manifest reader on a moto S3 server: version-1 manifests, shared ones, one run's entries only."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from airflow_flux.identity import pin_s3_uri
from airflow_flux.manifest import Manifest, ManifestImage, merge_manifest
from airflow_flux.plugins.store import GalleryError, GalleryImage, GalleryStore, ManifestRef


def _ref(s3, key: str, task_id: str, run_id: str = "run1") -> ManifestRef:
    return ManifestRef(
        dag_id="dag", run_id=run_id, task_id=task_id, map_index=-1, uri=f"s3://{s3.bucket}/{key}", conn_id="aws_default"
    )


def _shown(store: GalleryStore, run_id: str, refs: list[ManifestRef]) -> list[tuple[str, str]]:
    gallery = store.run_gallery(run_id, refs)
    assert gallery.errors == []
    return [(i.ref.task_id, i.key) for i in gallery.images]


def test_a_version_1_manifest_is_shown_under_its_task_for_its_own_run_only(s3):
    v1 = {
        "version": 1,
        "created_at": "2026-01-01T00:00:00+00:00",
        "dag_id": "dag",
        "run_id": "run1",
        "task_id": "to_s3",
        "map_index": -1,
        "bucket": s3.bucket,
        "prefix": "old",
        "images": [
            {"status": "copied", "key": "old/a_0.jpg", "index": 0, "sha256": "a" * 64},
            {"status": "skipped", "reason": "nsfw", "key": "old/a_1.jpg", "index": 1},
        ],
    }
    s3.put_object(Bucket=s3.bucket, Key="old/manifest.json", Body=json.dumps(v1).encode())
    store = GalleryStore()
    assert _shown(store, "run1", [_ref(s3, "old/manifest.json", "to_s3")]) == [
        ("to_s3", "old/a_0.jpg"),
        ("to_s3", "old/a_1.jpg"),
    ]
    # Another run that wrote into that prefix in the version-1 days was replaced by run1's manifest:
    # it shows nothing rather than run1's images.
    assert _shown(store, "run0", [_ref(s3, "old/manifest.json", "to_s3", run_id="run0")]) == []


def test_a_shared_manifest_is_read_once_and_each_image_shown_under_its_writer(s3):
    def part(run_id: str, task_id: str, key: str) -> Manifest:
        image = ManifestImage(status="copied", key=key, index=0, sha256=key[-5] * 64)
        return Manifest(
            created_at="2026-12-01T00:00:00+00:00",
            dag_id="dag",
            run_id=run_id,
            task_id=task_id,
            map_index=-1,
            bucket=s3.bucket,
            prefix="shared",
            images=[image],
        )

    for run_id, task_id, key in [
        ("run1", "to_s3_a", "shared/1.jpg"),
        ("run2", "to_s3_a", "shared/2.jpg"),
        ("run1", "to_s3_b", "shared/3.jpg"),
    ]:
        merge_manifest(s3, part(run_id, task_id, key), "shared/manifest.json")
    store = GalleryStore()
    refs = [_ref(s3, "shared/manifest.json", "to_s3_a"), _ref(s3, "shared/manifest.json", "to_s3_b")]
    assert _shown(store, "run1", refs) == [("to_s3_a", "shared/1.jpg"), ("to_s3_b", "shared/3.jpg")]
    run2 = [_ref(s3, "shared/manifest.json", "to_s3_a", run_id="run2")]
    assert _shown(store, "run2", run2) == [("to_s3_a", "shared/2.jpg")]


def test_an_edits_input_is_shown_as_the_version_that_was_edited(s3):
    def png(colour: tuple[int, int, int]) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(out, format="PNG")
        return out.getvalue()

    put = s3.put_object(Bucket=s3.bucket, Key="in/x.png", Body=png((200, 10, 10)))
    pinned = pin_s3_uri(s3.bucket, "in/x.png", etag=put["ETag"])
    image = GalleryImage(ref=_ref(s3, "edits/manifest.json", "to_s3"), bucket=s3.bucket, entry={"inputs": [pinned]})
    store = GalleryStore()
    data, _ = store.input_thumbnail(image, pinned)
    assert Image.open(io.BytesIO(data)).convert("RGB").getpixel((5, 5))[0] > 150
    # The input was replaced after the edit: the gallery does not show the new object as its input.
    s3.put_object(Bucket=s3.bucket, Key="in/x.png", Body=png((10, 10, 200)))
    with pytest.raises(GalleryError, match=r"412|PreconditionFailed"):
        store.input_thumbnail(image, pinned)
