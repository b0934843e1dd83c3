"""FluxBatchGenerateOperator and FluxBatchTrigger against the emulator (real sockets) and moto S3."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_flux.emulator import Scenario
from airflow_flux.exceptions import FluxTimeoutError, FluxValidationError
from airflow_flux.hooks import FluxHook
from airflow_flux.operators import FluxBatchGenerateOperator
from airflow_flux.triggers import FluxBatchTrigger
from airflow_flux.triggers.batch import pack_handles, unpack_handles
from tests.helpers import TOKEN, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

POLICY = Scenario(result_error_always=422)  # fal's content policy refusal: final, and may be billed
DISCONNECT = Scenario(complete_error={"error": "Runner disconnected", "error_type": "runner_disconnected"})


def _prompts(emu) -> list[str]:
    return sorted(job.input["prompt"] for job in emu.jobs.values())


def test_a_batch_of_12_prompts_lands_in_s3_with_its_failure_listed(dags, flux_default, s3, capfd):
    flux_default.add_scenario(POLICY, match="policy")
    prompts = [f"batch fox {i}" for i in range(11)] + ["a policy fox"]
    prompts.insert(5, prompts.pop())  # the refused one in the middle
    dr = dags.get_dag("flux_test_batch").test(run_conf={"requests": prompts, "bucket": s3.bucket})
    logs = capfd.readouterr()
    assert dr.state == "success", task_states(dr)
    assert len(flux_default.calls(kind="submit")) == 12
    results = xcom(dr, "batch")
    assert [r["index"] for r in results] == list(range(12))
    assert [r["prompt"] for r in results] == prompts  # input order, each with its own prompt
    assert [r["status"] for r in results] == ["completed"] * 5 + ["failed"] + ["completed"] * 6
    failed = results[5]
    assert failed["status_code"] == 422 and failed["error_type"] == "content_policy_violation"
    for result in results:
        if result["status"] == "completed":
            assert flux_default.jobs[result["request_id"]].input["prompt"] == result["prompt"]
            assert result["cost_usd"] == 0.04 and len(result["images"]) == 1

    run_prefix = f"batch/{dr.run_id}"
    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key=f"{run_prefix}/manifest.json")["Body"].read())
    statuses = [i["status"] for i in manifest["images"]]
    assert statuses.count("copied") == 11 and statuses.count("failed") == 1
    (entry,) = [i for i in manifest["images"] if i["status"] == "failed"]
    assert entry["prompt"] == "a policy fox" and "content_policy_violation" in entry["reason"] and entry["key"] is None
    assert manifest["cost_usd"] == pytest.approx(11 * 0.04)
    # Progress is counted, not one line per request; the token is nowhere.
    assert "FLUX batch finished: 11 of 12 done, 1 failed" in logs.out
    assert TOKEN not in logs.out + logs.err


def test_a_failure_beyond_allow_failures_fails_the_task_naming_it(dags, flux_default, capfd):
    flux_default.add_scenario(POLICY, match="policy")
    dr = dags.get_dag("flux_test_batch_strict").test(run_conf={"requests": ["a fine fox", "a policy fox"]})
    out = capfd.readouterr().out
    assert dr.state == "failed"
    assert "1 of 2 FLUX request(s) failed (allow_failures=0): requests[1]" in out
    assert "content_policy_violation" in out


class _Store:
    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = json.loads(json.dumps(value))


def _context(store: _Store | None = None, try_number: int = 1) -> dict[str, Any]:
    ti = SimpleNamespace(try_number=try_number, max_tries=1, task=None, xcom_push=lambda **kw: None)
    return {"task_state_store": store if store is not None else _Store(), "ti": ti}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"requests": ["a", "b", "c"], "num_images": 4, "max_images": 10},
            r"max_images: the batch of 3 request\(s\) would generate 12 images, more than max_images=10",
        ),
        ({"requests": ["fine", {"prompt": "x", "num_images": 9}]}, r"requests\[1\]: .*num_images: must be a number"),
        ({"requests": ["fine", {"seed": 1}]}, r"requests\[1\]: .*prompt: is required"),
        ({"requests": "a single prompt"}, r"requests: must be a list"),
        ({"requests": []}, r"requests: the batch is empty"),
    ],
)
def test_a_bad_batch_is_refused_before_any_call(emulator, flux_conn, kwargs, message):
    op = FluxBatchGenerateOperator(task_id="b", flux_conn_id=flux_conn, deferrable=False, **kwargs)
    with pytest.raises(FluxValidationError, match=message):
        op.execute(_context())
    assert emulator.requests == []


@pytest.mark.parametrize(
    ("dag_id", "kept"),
    [
        (
            "flux_test_batch_retry",
            "3 request(s) kept from earlier tries (3 completed or final, 0 awaited again); submitting 1",
        ),
        # A window (2 at a time) keeps its finished lines in checkpoints in the task state.
        (
            "flux_test_batch_retry_window",
            "3 request(s) kept from earlier tries (finished), 0 paid for and awaited again",
        ),
    ],
)
def test_a_retry_pays_only_for_the_transient_failure(dags, flux_default, capfd, dag_id, kept, monkeypatch):
    sent = _record_metrics(monkeypatch)
    flux_default.add_scenario(POLICY, match="policy")
    flux_default.add_scenario(DISCONNECT, match="disconnect")
    prompts = ["fox one", "a policy fox", "fox two", "a disconnect fox"]
    dr = dags.get_dag(dag_id).test(run_conf={"requests": prompts})
    out = capfd.readouterr().out
    assert dr.state == "success", task_states(dr)
    # Try 1 paid for 4; try 2 only for the request whose failure could pass.
    assert _prompts(flux_default) == sorted([*prompts, "a disconnect fox"])
    assert kept in out
    # The completed ones' results came from the task state: one result call each, all on try 1.
    results = xcom(dr, "batch")
    for result in results:
        if result["status"] == "completed":
            calls = [c for c in flux_default.calls(kind="result") if c.request_id == result["request_id"]]
            assert len(calls) == 1
    assert [r["status"] for r in results] == ["completed", "failed", "completed", "failed"]
    assert results[3]["error_type"] == "runner_disconnected"
    # Each outcome counted by the try that learned it: the two completed and the refusal once
    # (kept by try 2), the disconnected request twice (paid for twice).
    assert sent.count("flux.requests_completed") == 2
    assert sent.count("flux.requests_failed") == 3
    assert sent.count("flux.cost_usd") == 2 and sent.count("flux.generation_time") == 2


def _record_metrics(monkeypatch) -> list[str]:
    """The metric names ``airflow_flux.metrics`` sends while the test runs (in this process)."""
    from airflow_flux import metrics

    sent: list[str] = []

    class Recorder:
        def incr(self, stat, count=None, rate=None, *, tags=None):
            sent.append(stat)

        def timing(self, stat, dt, *, tags=None):
            sent.append(stat)

    monkeypatch.setattr(metrics, "_stats", Recorder)
    return sent


def test_the_deadline_cancels_what_is_unfinished(emulator, flux_conn):
    emulator.add_scenario(Scenario(never_complete=True), match="stuck")
    op = FluxBatchGenerateOperator(
        task_id="b",
        requests=["a quick fox", "a stuck fox", "another stuck fox"],
        flux_conn_id=flux_conn,
        deferrable=False,
        wait_timeout=2,
        poll_interval=0.2,
        allow_failures=1,
    )
    with pytest.raises(FluxTimeoutError, match=r"2 of 3 FLUX request\(s\) failed .*not finished within wait_timeout"):
        op.execute(_context())
    stuck = {rid for rid, job in emulator.jobs.items() if "stuck" in job.input["prompt"]}
    assert {c.request_id for c in emulator.calls(kind="cancel")} == stuck


async def test_the_batch_trigger_survives_re_creation_and_stays_small(emulator, flux_conn):
    emulator.add_scenario(Scenario(queue_seconds=0.5, run_seconds=1.0))
    hook = FluxHook(flux_conn_id=flux_conn)
    handles = [(i, hook.submit({"prompt": f"a trigger fox {i}"}).model_dump()) for i in range(20)]
    packed = pack_handles(handles)
    assert unpack_handles(packed)[3]["status_url"] == handles[3][1]["status_url"]
    first = FluxBatchTrigger(flux_conn_id=flux_conn, requests=packed, end_time=time.time() + 30, poll_interval=0.2)
    classpath, kwargs = first.serialize()
    row = json.dumps(kwargs)
    assert TOKEN not in row
    assert len(row) / 20 < 80, f"{len(row) / 20:.0f} bytes per request in the trigger row"

    # The first triggerer dies mid-wait; another re-creates the trigger from its row.
    gen = first.run()
    task = asyncio.ensure_future(gen.__anext__())
    await asyncio.sleep(0.8)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await gen.aclose()
    from airflow.providers.common.compat.module_loading import import_string

    again = import_string(classpath)(**kwargs)
    (event,) = [e.payload async for e in again.run()]
    assert event["status"] == "done"
    assert [o["status"] for o in event["outcomes"]] == ["completed"] * 20
    assert len(emulator.calls(kind="submit")) == 20, "re-creation submitted again"
    per_request = len(json.dumps(event)) / 20
    assert per_request < 600, f"{per_request:.0f} bytes per request in the event"


def test_with_a_results_bucket_the_xcom_is_a_summary_and_the_copy_reads_the_file(dags, flux_default, s3):
    flux_default.add_scenario(POLICY, match="policy")
    prompts = [f"results fox {i}" for i in range(9)] + ["a policy fox"]
    dr = dags.get_dag("flux_test_batch_results").test(run_conf={"requests": prompts, "bucket": s3.bucket})
    assert dr.state == "success", task_states(dr)
    summary = xcom(dr, "batch")
    key = f"flux/flux_test_batch_results/{dr.run_id}/_results/batch.jsonl"
    assert summary == {
        "kind": "flux_batch_results",
        "results_uri": f"s3://{s3.bucket}/{key}",
        "requests": 10,
        "completed": 9,
        "failed": 1,
        "images": 9,
        "cost_usd": pytest.approx(9 * 0.04),
        "endpoint": "fal-ai/flux-pro/kontext/text-to-image",
        "flux_conn_id": "flux_default",
    }
    assert len(json.dumps(summary)) < 400  # whatever the batch's size
    obj = s3.get_object(Bucket=s3.bucket, Key=key)
    lines = [json.loads(line) for line in obj["Body"].read().splitlines()]
    assert obj["Metadata"]["flux-run-id"] and obj["Metadata"]["flux-task-id"] == "batch"
    assert [(r["index"], r["prompt"], r["status"]) for r in lines] == [
        (i, p, "failed" if "policy" in p else "completed") for i, p in enumerate(prompts)
    ]
    for line in lines:  # each result is its own request's
        if line["status"] == "completed":
            assert flux_default.jobs[line["request_id"]].input["prompt"] == line["prompt"]
    assert lines[9]["error_type"] == "content_policy_violation" and lines[9]["status_code"] == 422

    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key=f"batch/{dr.run_id}/manifest.json")["Body"].read())
    statuses = sorted(i["status"] for i in manifest["images"])
    assert statuses == ["copied"] * 9 + ["failed"]
    assert {i["prompt"] for i in manifest["images"] if i["status"] == "copied"} == set(prompts[:9])
