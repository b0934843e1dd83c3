"""The manifest in S3, streamed (moto server): the same merge as in memory, in memory bounded by neither side."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from airflow_flux.exceptions import FluxImageExistsError
from airflow_flux.manifest import Manifest, ManifestImage, merge
from airflow_flux.manifest_store import ManifestPart, merge_manifest, write_manifest
from tests.test_manifest import version_1

KEY = "shared/manifest.json"
MB = 1024 * 1024


def _image(key: str, status: str = "copied") -> ManifestImage:
    return ManifestImage(status=status, key=key, index=0, request_id=key.rsplit("/", 1)[-1], sha256="0" * 64)


def _part(bucket: str, task_id: str, *keys: str, status: str = "copied") -> Manifest:
    return Manifest(
        created_at="2026-12-01T00:00:00+00:00",
        dag_id="dag",
        run_id="run1",
        task_id=task_id,
        map_index=-1,
        bucket=bucket,
        prefix="shared",
        images=[_image(k, status) for k in keys],
        cost_usd=0.04 * len(keys),
    )


def _read(s3) -> dict:
    return json.loads(s3.get_object(Bucket=s3.bucket, Key=KEY)["Body"].read())


def test_the_streamed_merge_writes_what_the_merge_in_memory_gives(s3):
    parts = [
        _part(s3.bucket, "a", "shared/x.jpg", "shared/a2.jpg"),
        _part(s3.bucket, "b", "shared/b1.jpg"),
        _part(s3.bucket, "c", "shared/x.jpg"),  # overwrote a's x.jpg
        _part(s3.bucket, "d", "shared/b1.jpg", status="reused"),  # found b's, left it
        _part(s3.bucket, "a", "shared/a2.jpg", status="reused"),  # a's retry: in a's place
    ]
    in_memory: Manifest | None = None
    for part in parts:
        in_memory = merge(in_memory, part)
        merge_manifest(s3, part, KEY)
        assert in_memory is not None
        assert _read(s3) == in_memory.model_dump(mode="json")


def test_a_version_1_manifest_in_s3_is_merged_as_one_writers(s3):
    v1 = version_1(s3.bucket)
    s3.put_object(Bucket=s3.bucket, Key=KEY, Body=json.dumps(v1, indent=2).encode())
    merge_manifest(s3, _part(s3.bucket, "b", "shared/b1.jpg"), KEY)
    written = _read(s3)
    assert [(i["task_id"], i["map_index"], i["key"]) for i in written["images"]] == [
        ("to_s3", 2, "shared/old.jpg"),
        ("b", -1, "shared/b1.jpg"),
    ]
    assert [w["task_id"] for w in written["writers"]] == ["to_s3", "b"]
    assert written["cost_usd"] == pytest.approx(0.08)


def test_a_manifest_with_a_bad_entry_is_refused_unless_replace(s3):
    good = _part(s3.bucket, "a", "shared/a1.jpg").model_dump(mode="json")
    good["images"].append({"status": "teleported", "key": "shared/a2.jpg", "index": 0})
    s3.put_object(Bucket=s3.bucket, Key=KEY, Body=json.dumps(good).encode())
    with pytest.raises(FluxImageExistsError, match=r"not a manifest \(1 schema error\(s\)\)"):
        merge_manifest(s3, _part(s3.bucket, "b", "shared/b1.jpg"), KEY)
    merge_manifest(s3, _part(s3.bucket, "b", "shared/b1.jpg"), KEY, replace=True)
    assert [i["key"] for i in _read(s3)["images"]] == ["shared/b1.jpg"]


def test_ten_thousand_entries_merge_into_ten_thousand_in_bounded_memory(s3):
    n = 10_000
    others = _part(s3.bucket, "other", *(f"shared/other/{i:05d}.jpg" for i in range(n)))
    merge_manifest(s3, others, KEY)
    del others

    tracemalloc.start()
    try:
        with ManifestPart(
            dag_id="dag", run_id="run1", task_id="mine", map_index=-1, bucket=s3.bucket, prefix="shared"
        ) as part:
            for start in range(0, n, 500):  # as the copy adds them, a chunk at a time
                part.add(_image(f"shared/mine/{i:05d}.jpg") for i in range(start, start + 500))
            written = write_manifest(s3, part, KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert (written.images, len(written.writers)) == (2 * n, 2)
    manifest = _read(s3)
    assert len(manifest["images"]) == 2 * n
    assert manifest["images"][n]["key"] == "shared/mine/00000.jpg"
    # Either side whole in memory would be 18 MB or more (about 1.8 KB per entry as objects).
    assert peak < 8 * MB, f"peak {peak / MB:.1f} MB"
