"""The batch window (operators/batch_window.py) against the emulator (real sockets) and moto S3."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from typing import TYPE_CHECKING, Any

import pytest

from airflow_flux.emulator import Scenario
from airflow_flux.exceptions import FluxError, FluxImageExistsError, FluxValidationError
from airflow_flux.operators import FluxBatchGenerateOperator
from airflow_flux.operators.batch_items import SLOT_KEY, WINDOW_KEY
from airflow_flux.results import parts_prefix, write_part
from tests.helpers import TOKEN, releasing, task_states, xcom
from tests.operators.test_batch import POLICY, _context, _Store

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.usefixtures("airflow_db")


def _owned_context(store: _Store | None = None, *, run_id: str = "r1", max_tries: int = 1) -> dict[str, Any]:
    context = _context(store)
    ti = context["ti"]
    ti.dag_id, ti.run_id, ti.task_id, ti.map_index, ti.max_tries = "d", run_id, "batch", -1, max_tries
    return context


def _never_more_than(emulator, limit: int) -> None:
    """Never more than ``limit`` submitted and unfinished, by the emulator's clock (it sees a
    request finish before the operator does, so the operator's own count is never lower)."""
    jobs = list(emulator.jobs.values())
    for job in jobs:
        unfinished = [o for o in jobs if o.submitted_at <= job.submitted_at < (o.completed_at or float("inf"))]
        assert len(unfinished) <= limit, [o.input["prompt"] for o in unfinished]


def _once_the_first_window_is_awaited(emulator, size: int, then: Callable[[set[str]], None]) -> Callable[[], bool]:
    """A :func:`releasing` condition: ``size`` requests submitted and each waited on (the wait asks
    only once a submit has returned and is recorded); ``then`` runs with them before it holds."""

    def condition() -> bool:
        jobs = set(emulator.jobs)
        if len(jobs) == size and jobs <= {c.request_id for c in emulator.calls(kind="status")}:
            then(jobs)
            return True
        return False

    return condition


def test_at_most_max_in_flight_requests_are_submitted_and_unfinished(emulator, flux_conn, capfd):
    # The first window's jobs are held running until the operator waits on every one of
    # them: then exactly the window has been submitted, however slow the machine.
    emulator.add_scenario(Scenario(hold_run="window"), match="window fox")
    prompts = [f"window fox {i}" for i in range(12)]
    submitted_when_waiting: list[int] = []

    def waiting_on_the_first_window() -> bool:
        jobs = emulator.jobs
        asked = {c.request_id for c in emulator.calls(kind="status")}
        if jobs and set(jobs) <= asked:  # the wait asks only once a submit has returned
            submitted_when_waiting.append(len(jobs))
            return True
        return False

    op = FluxBatchGenerateOperator(
        task_id="b", requests=prompts, flux_conn_id=flux_conn, poll_interval=0.05, max_in_flight=4
    )
    with releasing(emulator, ("window", waiting_on_the_first_window)):
        results = op.execute(_context())
    out = capfd.readouterr().out
    assert submitted_when_waiting == [4]
    assert [(r["index"], r["prompt"], r["status"]) for r in results] == [
        (i, p, "completed") for i, p in enumerate(prompts)
    ]
    for result in results:  # each result is its own request's
        assert emulator.jobs[result["request_id"]].input["prompt"] == result["prompt"]
        assert result["cost_usd"] == 0.04
    assert len(emulator.calls(kind="submit")) == 12
    _never_more_than(emulator, 4)
    # Progress: done, failed, in flight, to submit, cost so far; the last one says it all.
    progress = re.findall(
        r"FLUX batch: (\d+) of 12 done, (\d+) failed, (\d+) in flight, (\d+) to submit; \$([\d.]+) so far", out
    )
    assert progress[-1] == ("12", "0", "0", "0", "0.4800")
    assert all(float(cost) == pytest.approx(0.04 * int(done)) for done, _, _, _, cost in progress)
    assert TOKEN not in out


def test_the_deadline_cancels_the_window_and_submits_nothing_more(emulator, flux_conn):
    # Held queued until the deadline has passed: nothing of the first window can finish in time.
    emulator.add_scenario(Scenario(never_complete=True), match="stuck")
    op = FluxBatchGenerateOperator(
        task_id="b",
        requests=[f"a stuck fox {i}" for i in range(6)],
        flux_conn_id=flux_conn,
        wait_timeout=2,
        poll_interval=0.2,
        max_in_flight=2,
        allow_failures=6,
    )
    results = op.execute(_context())
    submitted = set(emulator.jobs)
    assert len(submitted) == 2  # the first window; the deadline came before any of it finished
    assert {c.request_id for c in emulator.calls(kind="cancel")} == submitted
    assert [r["request_id"] in submitted for r in results] == [True, True, False, False, False, False]
    assert {r["error"] for r in results[:2]} == {"not finished within wait_timeout"}
    assert {r["error"] for r in results[2:]} == {"not submitted: wait_timeout passed first"}
    assert all(r["status"] == "failed" for r in results)


def test_on_kill_cancels_the_requests_of_the_window_in_flight(emulator, flux_conn):
    # The first window is held queued (cancellable, as on fal) until the kill has happened.
    emulator.add_scenario(Scenario(hold_queue="killed"), match="killed fox")
    op = FluxBatchGenerateOperator(
        task_id="b",
        requests=[f"a killed fox {i}" for i in range(10)],
        flux_conn_id=flux_conn,
        poll_interval=0.05,
        max_in_flight=4,
        allow_failures=10,
    )
    in_flight_when_killed: list[set[str]] = []

    def kill(jobs: set[str]) -> None:
        in_flight_when_killed.append(jobs)
        op.on_kill()  # as Airflow does, from another thread than the task's

    killed = _once_the_first_window_is_awaited(emulator, 4, kill)
    with releasing(emulator, ("killed", killed)), contextlib.suppress(FluxError):
        op.execute(_context())  # in a real kill the process ends here; this one goes on
    assert len(in_flight_when_killed) == 1
    assert {c.request_id for c in emulator.calls(kind="cancel")} == in_flight_when_killed[0]


def test_a_window_whose_supervisor_died_submits_nothing_more(emulator, flux_conn, monkeypatch):
    # A worker killed as a process group leaves the task runner (a group of its own) running,
    # its parent gone: whatever it paid for from then on could not be recorded. Its first
    # window is held running until the parent is "gone", then finishes; no further submit.
    from airflow_flux.operators import batch_window

    emulator.add_scenario(Scenario(hold_run="orphan"), match="orphan fox")
    parent, orphaned = os.getppid(), threading.Event()
    monkeypatch.setattr(batch_window.os, "getppid", lambda: 1 if orphaned.is_set() else parent)
    op = FluxBatchGenerateOperator(
        task_id="b",
        requests=[f"an orphan fox {i}" for i in range(10)],
        flux_conn_id=flux_conn,
        poll_interval=0.05,
        max_in_flight=4,
    )

    with (
        releasing(emulator, ("orphan", _once_the_first_window_is_awaited(emulator, 4, lambda _: orphaned.set()))),
        pytest.raises(FluxError, match="supervisor process is gone"),
    ):
        op.execute(_context())
    assert len(emulator.calls(kind="submit")) == 4


def test_a_failed_submit_stops_the_window_and_what_was_paid_is_recorded(emulator, flux_conn):
    # The 4th submit is refused for good (422 on submit): no new submit starts, the ones in
    # flight finish and are recorded; a retry with the same store pays only for the rest.
    emulator.add_scenario(Scenario(submit_errors=[422]), match="refused")
    prompts = [f"fox {i}" for i in range(3)] + ["a refused fox"] + [f"fox {i}" for i in range(4, 8)]
    store = _Store()
    op = FluxBatchGenerateOperator(
        task_id="b", requests=prompts, flux_conn_id=flux_conn, poll_interval=0.05, max_in_flight=2, max_images=10
    )
    with pytest.raises(FluxError, match=r"requests\[3\]: the submit failed"):
        op.execute(_context(store))
    paid = {job.input["prompt"] for job in emulator.jobs.values()}
    assert "a refused fox" not in paid and {"fox 0", "fox 1", "fox 2"} <= paid
    first = len(emulator.calls(kind="submit"))

    again = FluxBatchGenerateOperator(
        task_id="b", requests=prompts, flux_conn_id=flux_conn, poll_interval=0.05, max_in_flight=2, max_images=10
    )
    results = again.execute(_context(store, try_number=2))
    assert [r["status"] for r in results] == ["completed"] * 8
    resubmitted = [c for c in emulator.calls(kind="submit")][first:]
    assert len(resubmitted) == 8 - len(paid)  # nothing paid for is paid for again
    for result in results:
        assert emulator.jobs[result["request_id"]].input["prompt"] == result["prompt"]


def test_a_retry_awaits_what_an_earlier_try_paid_for_and_a_changed_input_is_sent_anew(emulator, flux_conn):
    # An earlier try's slot says requests[1] is paid for and unfinished: awaited, not paid again.
    # requests[2]'s slot is for another prompt than the list has now: sent anew.
    store = _Store()
    ctx = _owned_context(store)
    from airflow_flux.hooks import FluxHook
    from airflow_flux.identity import RequestIdentity, StoredRequest

    hook = FluxHook(flux_conn_id=flux_conn)
    endpoint = hook.settings.endpoint
    prompts = [f"resumed fox {i}" for i in range(5)]

    def slot(slot: int, index: int, prompt: str) -> str:
        payload = {"prompt": prompt}
        handle = {**hook.submit(payload, endpoint=endpoint).model_dump(), "index": index}
        identity = RequestIdentity.of(endpoint=endpoint, payload=payload, base_url=hook.settings.base_url)
        store.set(SLOT_KEY.format(slot=slot), StoredRequest(handle=handle, identity=identity, max_tries=1).model_dump())
        return handle["request_id"]

    kept = slot(0, 1, prompts[1])
    slot(1, 2, "a prompt that is no longer in the list")
    store.set(WINDOW_KEY, {"requests": 5, "slots": 3})
    before = len(emulator.calls(kind="submit"))
    op = FluxBatchGenerateOperator(
        task_id="batch", requests=prompts, flux_conn_id=flux_conn, poll_interval=0.05, max_in_flight=2
    )
    results = op.execute(ctx)
    assert results[1]["request_id"] == kept
    assert len(emulator.calls(kind="submit")) - before == 4
    for result in results:
        assert emulator.jobs[result["request_id"]].input["prompt"] == result["prompt"]


def test_with_a_results_bucket_checkpoints_go_to_s3_and_a_retry_keeps_them(emulator, flux_conn, s3, monkeypatch):
    monkeypatch.setattr("airflow_flux.operators.batch_items.S3Checkpoints.lines_per_part", 2)
    emulator.add_scenario(POLICY, match="policy")
    prompts = [f"checkpoint fox {i}" for i in range(6)] + ["a policy fox"]
    kwargs = {
        "task_id": "batch",
        "requests": prompts,
        "flux_conn_id": flux_conn,
        "poll_interval": 0.05,
        "max_in_flight": 2,
        "results_s3_bucket": s3.bucket,
    }
    store = _Store()
    with pytest.raises(FluxError, match=r"1 of 7 FLUX request\(s\) failed .*requests\[6\]"):
        FluxBatchGenerateOperator(**kwargs).execute(_owned_context(store))
    key = "flux/d/r1/_results/batch.jsonl"
    parts = s3.list_objects_v2(Bucket=s3.bucket, Prefix=parts_prefix(key))["Contents"]
    assert len(parts) >= 3  # two lines per checkpoint
    written = [json.loads(line) for line in s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read().splitlines()]
    assert [(w["index"], w["status"]) for w in written] == [(i, "completed") for i in range(6)] + [(6, "failed")]
    assert not any("fingerprint" in w for w in written)
    paid = len(emulator.calls(kind="submit"))

    # The retry keeps every line (the refusal is final): nothing is paid for again.
    summary = FluxBatchGenerateOperator(**kwargs, allow_failures=1).execute(_owned_context(store))
    assert len(emulator.calls(kind="submit")) == paid
    assert (summary["requests"], summary["completed"], summary["failed"]) == (7, 6, 1)
    assert summary["cost_usd"] == pytest.approx(6 * 0.04)


def test_another_task_instances_checkpoints_or_results_are_refused_before_any_call(emulator, flux_conn, s3):
    key = "shared/results.jsonl"
    owner = {"dag_id": "d", "run_id": "another run", "task_id": "batch", "map_index": -1}
    write_part(s3, s3.bucket, key, 0, [{"index": 0, "status": "completed"}], owner=owner)
    op = FluxBatchGenerateOperator(
        task_id="batch",
        requests=[f"fox {i}" for i in range(5)],
        flux_conn_id=flux_conn,
        max_in_flight=2,
        results_s3_bucket=s3.bucket,
        results_s3_key=key,
    )
    store = _Store()
    store.set(WINDOW_KEY, {"requests": 5, "slots": 3})  # as if an earlier try had begun
    with pytest.raises(FluxImageExistsError, match="another task instance"):
        op.execute(_owned_context(store))
    assert emulator.calls(kind="submit") == []


def test_a_large_batch_without_a_results_bucket_is_refused_before_any_call(emulator, flux_conn):
    op = FluxBatchGenerateOperator(
        task_id="b", requests=[f"fox {i}" for i in range(1001)], flux_conn_id=flux_conn, max_images=2000
    )
    with pytest.raises(FluxValidationError, match=r"results_s3_bucket: a batch of 1001 requests"):
        op.execute(_context())
    assert emulator.requests == []


def test_the_window_runs_in_a_dag_and_the_copy_lands_every_image(dags, flux_default, s3):
    flux_default.add_scenario(POLICY, match="policy")
    prompts = [f"results fox {i}" for i in range(9)] + ["a policy fox"]
    dr = dags.get_dag("flux_test_batch_results_window").test(run_conf={"requests": prompts, "bucket": s3.bucket})
    assert dr.state == "success", task_states(dr)
    assert len(flux_default.calls(kind="submit")) == 10
    _never_more_than(flux_default, 3)
    summary = xcom(dr, "batch")
    assert (summary["completed"], summary["failed"]) == (9, 1)
    copy = xcom(dr, "to_s3")  # small too, whatever the batch's size
    assert copy == {
        "kind": "flux_copy",
        "manifest_uri": f"s3://{s3.bucket}/batch/{dr.run_id}/manifest.json",
        "bucket": s3.bucket,
        "prefix": f"batch/{dr.run_id}",
        "images": 9,
        "skipped": 0,
        "failed": 1,
    }
    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key=f"batch/{dr.run_id}/manifest.json")["Body"].read())
    assert sorted(i["status"] for i in manifest["images"]) == ["copied"] * 9 + ["failed"]
    assert {i["prompt"] for i in manifest["images"] if i["status"] == "copied"} == set(prompts[:9])
