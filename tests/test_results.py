"""A batch's results file in S3 (moto over real sockets): written whole, read only by its DAG run."""

from __future__ import annotations

import pytest

from airflow_flux.exceptions import FluxError, FluxImageExistsError
from airflow_flux.results import BatchResultsSummary, default_results_key, read_results, summarize, write_results

OWNER = {"dag_id": "d", "run_id": "manual__2026-12-04T00:00:00+00:00", "task_id": "batch", "map_index": -1}
LINES = [
    {"index": 0, "prompt": "a fox", "status": "completed", "images": [{"url": "u"}], "cost_usd": 0.04},
    {"index": 1, "prompt": "ü fox", "status": "failed", "error": "refused", "status_code": 422},
]


def test_written_lines_are_read_back_by_the_same_run(s3):
    key = default_results_key(OWNER)
    assert key == "flux/d/manual__2026-12-04T00:00:00+00:00/_results/batch.jsonl"
    assert default_results_key({**OWNER, "map_index": 3}).endswith("/_results/batch.3.jsonl")
    assert write_results(s3, s3.bucket, key, iter(LINES), owner=OWNER) == 2
    uri = f"s3://{s3.bucket}/{key}"
    assert list(read_results(s3, uri, dag_id="d", run_id=OWNER["run_id"])) == LINES
    summary = summarize(LINES, uri, "fal-ai/x", "flux_default")
    assert (summary.requests, summary.completed, summary.failed, summary.images, summary.cost_usd) == (2, 1, 1, 1, 0.04)
    assert BatchResultsSummary.is_summary(summary.model_dump()) and not BatchResultsSummary.is_summary(LINES)


def test_another_runs_results_are_refused(s3):
    # An XCom may name any object: only one written by a task of this very DAG run is read.
    key = default_results_key(OWNER)
    write_results(s3, s3.bucket, key, LINES, owner=OWNER)
    with pytest.raises(FluxError, match="not written by a task of this DAG run"):
        list(read_results(s3, f"s3://{s3.bucket}/{key}", dag_id="d", run_id="another_run"))
    with pytest.raises(FluxError, match="not written by a task of this DAG run"):
        list(read_results(s3, f"s3://{s3.bucket}/{key}", dag_id="other_dag", run_id=OWNER["run_id"]))
    s3.put_object(Bucket=s3.bucket, Key="plain.jsonl", Body=b'{"index": 0}\n')
    with pytest.raises(FluxError, match="written by no FLUX task"):
        list(read_results(s3, f"s3://{s3.bucket}/plain.jsonl", dag_id="d", run_id=OWNER["run_id"]))
    with pytest.raises(FluxError, match="cannot be read"):
        list(read_results(s3, f"s3://{s3.bucket}/missing.jsonl", dag_id="d", run_id=OWNER["run_id"]))


def test_a_key_holding_another_task_instances_results_is_not_overwritten(s3):
    key = "shared/results.jsonl"
    write_results(s3, s3.bucket, key, LINES, owner=OWNER)
    write_results(s3, s3.bucket, key, LINES[:1], owner=OWNER)  # its own retry rewrites it
    for other in ({**OWNER, "run_id": "r2"}, {**OWNER, "map_index": 0}, {**OWNER, "task_id": "b2"}):
        with pytest.raises(FluxImageExistsError, match="it holds the results of"):
            write_results(s3, s3.bucket, key, LINES, owner=other)
    s3.put_object(Bucket=s3.bucket, Key="other.txt", Body=b"not results")
    with pytest.raises(FluxImageExistsError, match="not a FLUX results file"):
        write_results(s3, s3.bucket, "other.txt", LINES, owner=OWNER)
    body = s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    assert body.count(b"\n") == 1  # the owner's last write, whole


def test_the_copy_refuses_a_summary_naming_another_runs_results(s3):
    from types import SimpleNamespace

    from airflow_flux.transfers import FluxToS3Operator

    key = default_results_key(OWNER)
    write_results(s3, s3.bucket, key, LINES, owner=OWNER)
    forged = summarize(LINES, f"s3://{s3.bucket}/{key}", None, None).model_dump()
    op = FluxToS3Operator(task_id="to_s3", source=forged, s3_bucket=s3.bucket)
    other_run = {"ti": SimpleNamespace(dag_id="d", run_id="scheduled__2026-12-05")}
    with pytest.raises(FluxError, match="not written by a task of this DAG run"):
        op._results(other_run)
    same_run = {"ti": SimpleNamespace(dag_id="d", run_id=OWNER["run_id"])}
    results, failed = op._results(same_run)
    assert [r.prompt for r in results] == ["a fox"] and [f.prompt for f in failed] == ["ü fox"]
