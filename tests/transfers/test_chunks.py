"""FluxToS3Operator reading a batch's results file in chunks (emulator CDN and moto over sockets)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_flux.exceptions import FluxImageExistsError
from airflow_flux.hooks import FluxHook
from airflow_flux.results import default_results_key, summarize, write_results
from airflow_flux.transfers import FluxToS3Operator

OWNER = {"dag_id": "d", "run_id": "r", "task_id": "batch", "map_index": -1}


def _results_file(emulator, flux_conn: str, s3, count: int) -> dict[str, Any]:
    """A batch's results file of ``count`` completed requests of the emulator, and its summary."""
    lines = _lines(flux_conn, count)
    key = default_results_key(OWNER)
    write_results(s3, s3.bucket, key, lines, owner=OWNER)
    return summarize(lines, f"s3://{s3.bucket}/{key}", None, flux_conn).model_dump()


def _lines(flux_conn: str, count: int) -> list[dict[str, Any]]:
    """``count`` completed requests of the emulator, as a batch's result items."""
    hook = FluxHook(flux_conn_id=flux_conn)
    lines = []
    for index in range(count):
        handle = hook.submit({"prompt": f"chunk fox {index}"})
        hook.wait_for_completion(handle, timeout=30, poll_interval=0.05)
        result = hook.get_result(handle)
        lines.append(
            {
                **result.model_dump(mode="json", exclude_none=True),
                "index": index,
                "status": "completed",
                "flux_conn_id": flux_conn,
                "cost_usd": 0.04,
            }
        )
    return lines


def _context() -> dict[str, Any]:
    ti = SimpleNamespace(**OWNER, xcom_push=lambda **_: None)
    return {"ti": ti}


def _keys(s3, prefix: str) -> list[str]:
    return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=s3.bucket, Prefix=prefix).get("Contents", []))


def test_a_results_file_is_copied_a_chunk_at_a_time(emulator, flux_conn, s3, monkeypatch):
    monkeypatch.setattr("airflow_flux.transfers.flux_to_s3.CHUNK", 3)
    copied: list[int] = []
    original = FluxToS3Operator._copy_all

    def counting(self, results, created):
        copied.append(len(results))
        return original(self, results, created)

    monkeypatch.setattr(FluxToS3Operator, "_copy_all", counting)
    summary = _results_file(emulator, flux_conn, s3, 8)
    op = FluxToS3Operator(task_id="to_s3", source=summary, s3_bucket=s3.bucket, s3_key_prefix="out")
    value = op.execute(_context())
    assert copied == [3, 3, 2]  # never more than a chunk planned and held at once
    assert value == {
        "kind": "flux_copy",
        "manifest_uri": f"s3://{s3.bucket}/out/manifest.json",
        "bucket": s3.bucket,
        "prefix": "out",
        "images": 8,
        "skipped": 0,
        "failed": 0,
    }
    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key="out/manifest.json")["Body"].read())
    assert sorted(i["prompt"] for i in manifest["images"]) == sorted(f"chunk fox {i}" for i in range(8))
    assert manifest["cost_usd"] == pytest.approx(8 * 0.04)
    assert len(_keys(s3, "out/")) == 9


def test_a_clash_in_a_later_chunk_deletes_what_the_earlier_chunks_wrote(emulator, flux_conn, s3, monkeypatch):
    monkeypatch.setattr("airflow_flux.transfers.flux_to_s3.CHUNK", 3)
    summary = _results_file(emulator, flux_conn, s3, 8)
    # Someone else's object where the 7th image (third chunk) would go.
    lines = [
        json.loads(raw)
        for raw in s3.get_object(Bucket=s3.bucket, Key=summary["results_uri"].split("/", 3)[3])["Body"]
        .read()
        .splitlines()
    ]
    taken = f"out/{lines[6]['request_id']}_0.jpg"
    s3.put_object(Bucket=s3.bucket, Key=taken, Body=b"not ours")
    op = FluxToS3Operator(task_id="to_s3", source=summary, s3_bucket=s3.bucket, s3_key_prefix="out")
    with pytest.raises(FluxImageExistsError, match="Refusing to overwrite"):
        op.execute(_context())
    assert _keys(s3, "out/") == [taken]  # the first two chunks' six images were deleted again


@pytest.mark.parametrize(("bound", "named"), [(4, "images"), (3, "prefix")])
def test_lineage_names_each_image_or_past_many_their_prefix(emulator, flux_conn, s3, monkeypatch, bound, named):
    # The record the openlineage provider's listener reads (get_openlineage_facets_on_complete):
    # from the bound on, one dataset, the prefix, stands for the images, so events stay bounded.
    pytest.importorskip("airflow.providers.openlineage")
    monkeypatch.setattr("airflow_flux.lineage.MAX_DATASETS", bound)
    # A list of results (a batch's summary always names the prefix: its images are many).
    op = FluxToS3Operator(task_id="to_s3", source=_lines(flux_conn, 3), s3_bucket=s3.bucket, s3_key_prefix="out")
    op.execute(_context())
    images = [k for k in _keys(s3, "out/") if not k.endswith("manifest.json")]
    expected = images if named == "images" else ["out"]
    lineage = op.get_openlineage_facets_on_complete(None)
    assert sorted(d.name for d in lineage.outputs) == sorted([*expected, "out/manifest.json"])
    assert {d.namespace for d in lineage.outputs} == {f"s3://{s3.bucket}"}
    facet = lineage.run_facets["flux"]
    assert facet.requests == 3 and facet.images == 3 and len(facet.requestIds) == 3
