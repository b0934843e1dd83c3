"""What the gallery takes from the metadata DB, and what it refuses to take on an XCom's word (issue #22)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from airflow_flux.plugins.records import ManifestRef, RunRecords


def _png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(out, format="PNG")
    return out.getvalue()


def test_a_manifest_is_read_only_where_the_tasks_record_says_it_wrote():
    records = RunRecords(default_conn_id="gallery_default")
    ref = ManifestRef(dag_id="d", run_id="r", task_id="t", map_index=-1, uri="s3://b/p/manifest.json", conn_id="x")
    record = {"s3_bucket": "b", "s3_key_prefix": "/p/", "manifest_name": "manifest.json", "aws_conn_id": "task_aws"}
    checked = records._checked(ref, record)
    assert (checked.refused, checked.bucket, checked.prefix, checked.conn_id) == (None, "b", "p", "task_aws")
    # The XCom names another manifest (another DAG's, another prefix's, another bucket's).
    for uri in ("s3://b/other/manifest.json", "s3://other/p/manifest.json", "s3://b/p/x.json"):
        refused = records._checked(ManifestRef(**{**ref.__dict__, "uri": uri}), record).refused
        assert refused == "the XCom does not name the manifest this task wrote (s3://b/p/manifest.json)", uri
    # No record (rendered fields no longer kept), or not a copy task's.
    assert "not on record" in str(records._checked(ref, None).refused)
    assert "name no manifest" in str(records._checked(ref, {"python_callable": "f"}).refused)
    # No connection in the record: the gallery's default, never one a manifest names.
    assert records._checked(ref, {**record, "aws_conn_id": None}).conn_id == "x"


@pytest.mark.usefixtures("airflow_db")
def test_an_input_is_read_only_when_a_task_of_the_run_named_it(dags, flux_default, s3):
    from airflow.utils.session import create_session

    s3.put_object(Bucket=s3.bucket, Key="in/x.png", Body=_png((200, 10, 10)), ContentType="image/png")
    s3.put_object(Bucket=s3.bucket, Key="in/secret.png", Body=_png((10, 10, 200)), ContentType="image/png")
    dr = dags.get_dag("flux_test_edit_from_s3").test(run_conf={"bucket": s3.bucket, "key": "in/x.png"})
    assert dr.state == "success"
    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key="edits/manifest.json")["Body"].read())
    [entry] = [e for e in manifest["images"] if e.get("run_id") == dr.run_id]
    [pinned] = entry["inputs"]  # s3://bucket/in/x.png?etag=... : the version edited
    assert pinned.startswith(f"s3://{s3.bucket}/in/x.png?")
    with create_session() as session:
        named = RunRecords.names_input
        assert named(session, "flux_test_edit_from_s3", dr.run_id, pinned)
        # What a rewritten manifest could name instead: never named by this run's tasks.
        for uri in (f"s3://{s3.bucket}/in/secret.png", f"s3://{s3.bucket}/in/x.png.bak", "s3://other/in/x.png"):
            assert not named(session, "flux_test_edit_from_s3", dr.run_id, uri), uri
        assert not named(session, "flux_test_edit_from_s3", "another run", pinned)
