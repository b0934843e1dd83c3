"""The gallery's manifest reader on a moto S3 server: version-1 manifests, shared ones, one run's
entries only, and what it refuses to take on a manifest's or an XCom's word (issue #22)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from airflow_flux.identity import pin_s3_uri
from airflow_flux.manifest import Manifest, ManifestImage
from airflow_flux.manifest_store import merge_manifest
from airflow_flux.plugins.records import ManifestRef
from airflow_flux.plugins.store import GalleryError, GalleryImage, GalleryStore, NoThumbnail


def _ref(s3, key: str, task_id: str, run_id: str = "run1") -> ManifestRef:
    """A reference as :meth:`RunRecords.manifest_refs` makes it for a task whose record matches."""
    return ManifestRef(
        dag_id="dag",
        run_id=run_id,
        task_id=task_id,
        map_index=-1,
        uri=f"s3://{s3.bucket}/{key}",
        conn_id="aws_default",
        bucket=s3.bucket,
        prefix=key.rpartition("/")[0],
    )


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


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
    png = _png
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


# -- what is not taken on trust -----------------------------------------------------------------


def test_a_manifest_that_names_another_bucket_or_keys_outside_the_prefix_is_not_followed(s3):
    part = Manifest(
        created_at="2026-12-01T00:00:00+00:00",
        dag_id="dag",
        run_id="run1",
        task_id="to_s3",
        map_index=-1,
        bucket=s3.bucket,
        prefix="mine",
        images=[
            ManifestImage(status="copied", key="mine/a.jpg", index=0, sha256="a" * 64),
            ManifestImage(status="copied", key="secret/b.jpg", index=1, sha256="b" * 64),
            ManifestImage(status="copied", key="mine-not/c.jpg", index=2, sha256="c" * 64),
        ],
    )
    merge_manifest(s3, part, "mine/manifest.json")
    store = GalleryStore()
    gallery = store.run_gallery("run1", [_ref(s3, "mine/manifest.json", "to_s3")])
    assert [i.key for i in gallery.images] == ["mine/a.jpg"]
    assert [m for _, m in gallery.errors] == ["2 entries outside the task's prefix (mine/) not shown"]
    assert gallery.find("b" * 64) is None
    # A manifest rewritten to send readers to another bucket is not read at all.
    forged = json.loads(s3.get_object(Bucket=s3.bucket, Key="mine/manifest.json")["Body"].read())
    s3.put_object(Bucket=s3.bucket, Key="other/manifest.json", Body=json.dumps({**forged, "bucket": "elsewhere"}))
    gallery = GalleryStore().run_gallery("run1", [_ref(s3, "other/manifest.json", "to_s3")])
    assert gallery.images == []
    assert [m for _, m in gallery.errors] == [f"it names bucket 'elsewhere', not the task's ({s3.bucket!r})"]


def test_only_entries_of_the_tasks_that_share_the_manifest_are_shown(s3):
    for task_id, key in [("to_s3", "shared/1.jpg"), ("not_named", "shared/2.jpg")]:
        image = ManifestImage(status="copied", key=key, index=0, sha256=key[-5] * 64)
        own = Manifest(
            created_at="2026-12-01T00:00:00+00:00",
            dag_id="dag",
            run_id="run1",
            task_id=task_id,
            map_index=-1,
            bucket=s3.bucket,
            prefix="shared",
            images=[image],
        )
        merge_manifest(s3, own, "shared/manifest.json")
    # Only to_s3's XCom names the manifest: an entry claiming another task of the run is not shown.
    assert _shown(GalleryStore(), "run1", [_ref(s3, "shared/manifest.json", "to_s3")]) == [("to_s3", "shared/1.jpg")]
    # A refused reference is reported, and its manifest not read.
    refused = ManifestRef(**{**_ref(s3, "shared/manifest.json", "to_s3").__dict__, "refused": "no"})
    gallery = GalleryStore().run_gallery("run1", [refused])
    assert (gallery.images, gallery.errors) == ([], [(refused, "no")])


def test_a_thumbnail_is_guarded_by_s3s_own_length_not_the_manifests(s3, monkeypatch):
    import airflow_flux.plugins.store as store_module

    big = _png((200, 10, 10), size=(300, 300))
    s3.put_object(Bucket=s3.bucket, Key="mine/big.png", Body=big)
    monkeypatch.setattr(store_module, "MAX_THUMBNAIL_SOURCE_BYTES", len(big) - 1)
    # A reused image has no size in its manifest (and a manifest can say anything).
    for size in (None, 10):
        entry = {"key": "mine/big.png", "sha256": f"{size}".ljust(64, "0"), "status": "copied", "size": size}
        image = GalleryImage(ref=_ref(s3, "mine/manifest.json", "to_s3"), bucket=s3.bucket, entry=entry)
        with pytest.raises(NoThumbnail):
            GalleryStore().thumbnail(image)
    monkeypatch.setattr(store_module, "MAX_THUMBNAIL_SOURCE_BYTES", len(big))
    data, _ = GalleryStore().thumbnail(image)
    assert Image.open(io.BytesIO(data)).size == (300, 300)


def test_without_pillow_there_is_no_thumbnail_and_the_image_itself_is_sent(s3):
    import importlib.util

    s3.put_object(Bucket=s3.bucket, Key="mine/small.png", Body=_png((10, 200, 10)))
    entry = {"key": "mine/small.png", "sha256": "b" * 64, "status": "copied"}
    image = GalleryImage(ref=_ref(s3, "mine/manifest.json", "to_s3"), bucket=s3.bucket, entry=entry)
    real = importlib.util.find_spec
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "PIL" else real(name, *a))
        with pytest.raises(NoThumbnail, match=r"airflow-flux\[thumbnails\]"):
            GalleryStore().thumbnail(image)
    assert Image.open(io.BytesIO(GalleryStore().thumbnail(image)[0])).size == (40, 30)
