"""Copy tasks sharing a prefix share its manifest: real dag.test() runs, moto S3, the gallery's reader."""

from __future__ import annotations

import json

import pytest

from airflow_flux.plugins.records import RunRecords
from airflow_flux.plugins.store import GalleryStore
from tests.helpers import task_states

pytestmark = pytest.mark.usefixtures("airflow_db")

DAG_ID = "flux_test_shared_prefix"


def _run(dags, dag_id: str, **params):
    # Every param given explicitly: a run must not depend on another's conf.
    defaults = {
        "num_images": 1,
        "sync_mode": False,
        "nsfw": "skip",
        "prefix": "",
        "key_template": "{request_id}_{index}.{ext}",
        "aspect_ratio": "1:1",
    }
    return dags.get_dag(dag_id).test(run_conf={**defaults, **params})


def _manifest(s3, key: str) -> dict:
    return json.loads(s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read())


def _gallery(run_id: str) -> list[tuple[str, str]]:
    """What the gallery shows of a run: (task, key) of each image, found as its pages find them."""
    from airflow.utils.session import create_session

    store = GalleryStore()
    with create_session() as session:
        refs = RunRecords().manifest_refs(session, DAG_ID, [run_id])[run_id]
    assert len(refs) == 2 and len({r.uri for r in refs}) == 1, "two tasks, one manifest"
    return [(i.ref.task_id, i.key) for i in store.run_gallery(run_id, refs).images]


def test_two_copy_tasks_of_a_run_and_a_later_run_in_one_prefix_list_every_image(dags, flux_default, s3):
    first = _run(dags, DAG_ID, prompt="shared fox", bucket=s3.bucket, prefix="shared")
    assert first.state == "success", task_states(first)
    images = [k for k in _keys(s3) if not k.endswith("manifest.json")]
    assert len(images) == 2
    manifest = _manifest(s3, "shared/manifest.json")
    entries = {i["task_id"]: i for i in manifest["images"]}
    # Both tasks' images, once each: to_s3_a's retry (reusing its copy) replaced its own entry.
    assert len(manifest["images"]) == 2
    assert sorted(i["key"] for i in manifest["images"]) == sorted(images)
    assert (entries["to_s3_a"]["status"], entries["to_s3_b"]["status"]) == ("reused", "copied")
    assert {i["run_id"] for i in manifest["images"]} == {first.run_id}
    assert sorted(w["task_id"] for w in manifest["writers"]) == ["to_s3_a", "to_s3_b"]
    assert manifest["version"] == 2
    assert manifest["cost_usd"] == pytest.approx(sum(w["cost_usd"] for w in manifest["writers"]))
    assert sorted(_gallery(first.run_id)) == sorted((t, e["key"]) for t, e in entries.items())

    # A later run into the same prefix: its images join the manifest, and each run's page
    # shows its own images only.
    second = _run(dags, DAG_ID, prompt="shared owl", bucket=s3.bucket, prefix="shared")
    assert second.state == "success", task_states(second)
    manifest = _manifest(s3, "shared/manifest.json")
    assert len(manifest["images"]) == 4 == len(_keys(s3)) - 1
    assert sorted(_gallery(first.run_id)) == sorted((t, e["key"]) for t, e in entries.items())
    shown = _gallery(second.run_id)
    assert sorted(t for t, _ in shown) == ["to_s3_a", "to_s3_b"]
    assert not {k for _, k in shown} & {e["key"] for e in entries.values()}


def _keys(s3) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket).get("Contents", []))


def test_a_manifest_key_holding_something_else_fails_the_copy_before_anything_is_written(dags, flux_default, s3, capfd):
    s3.put_object(Bucket=s3.bucket, Key="taken/manifest.json", Body=b"someone's notes")
    dr = _run(dags, "flux_test_to_s3", prompt="a blocked fox", bucket=s3.bucket, prefix="taken")
    assert dr.state == "failed"
    assert f"Refusing to overwrite s3://{s3.bucket}/taken/manifest.json: not a manifest" in capfd.readouterr().out
    assert _keys(s3) == ["taken/manifest.json"]
    assert s3.get_object(Bucket=s3.bucket, Key="taken/manifest.json")["Body"].read() == b"someone's notes"
