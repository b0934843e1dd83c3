"""A reused request is the very request this try would submit (real sockets: the emulator).

The retry tests run DAGs whose tasks fail right after their submit on try 1 (a
``post_execute`` hook, as a worker lost at the worst moment) and are retried at once by
``dag.test()``; the emulator says what was paid for and which prompt each request had.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from airflow_flux.emulator import FluxEmulator
from airflow_flux.identity import STATE_KEY
from airflow_flux.operators import FluxSubmitOperator
from tests.helpers import TOKEN, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


def _submitted_prompts(emu: FluxEmulator) -> list[str]:
    return sorted(job.input["prompt"] for job in emu.jobs.values())


def _prompt_of(emu: FluxEmulator, request_id: str) -> str:
    return emu.jobs[request_id].input["prompt"]


def test_retries_reuse_only_the_request_they_would_submit(dags, flux_default, capfd):
    dr = dags.get_dag("flux_test_request_identity").test()
    logs = capfd.readouterr()
    text = logs.out + logs.err
    assert dr.state == "success", task_states(dr)

    # Every task ran twice; only those whose input is the same on try 2 reused their request.
    assert _submitted_prompts(flux_default) == sorted(
        ["first cat", "second cat", "the same dog", "first dog", "second dog", "owl A", "owl B", "owl B", "owl A"]
    )

    # The changed render: try 2 paid again and the sensor returns *its* images.
    handle, result = xcom(dr, "submit_changed"), xcom(dr, "wait_changed")
    assert _prompt_of(flux_default, handle["request_id"]) == "second cat"
    assert result["request_id"] == handle["request_id"] and result["prompt"] == "second cat"
    assert "is for a different input (prompt differ); submitting fresh" in text

    # The generate operator: the unchanged retry reused (one submit), the changed one did not.
    same = xcom(dr, "generate_same")
    assert same["prompt"] == "the same dog" and _prompt_of(flux_default, same["request_id"]) == "the same dog"
    assert f"FLUX request {same['request_id']} of try 1 already completed; its result was kept" in text
    # ... and was not waited on again: its result was kept by try 1, so no second deferral,
    # status or result call.
    assert len([c for c in flux_default.calls(kind="stream") if c.request_id == same["request_id"]]) == 1
    assert len([c for c in flux_default.calls(kind="result") if c.request_id == same["request_id"]]) == 1
    changed = xcom(dr, "generate_changed")
    assert changed["prompt"] == "second dog" and _prompt_of(flux_default, changed["request_id"]) == "second dog"

    # The mapped list that changed order: each map index got its own prompt's image.
    for index, prompt in enumerate(["owl B", "owl A"]):
        handle, result = xcom(dr, "submit_mapped", index), xcom(dr, "wait_mapped", index)
        assert _prompt_of(flux_default, handle["request_id"]) == prompt
        assert result["request_id"] == handle["request_id"] and result["prompt"] == prompt
    assert TOKEN not in text


def _task_log(capfd: pytest.CaptureFixture[str]) -> str:
    """What the operators logged (the Task SDK's logger writes to the process's stdout)."""
    out = capfd.readouterr()
    return out.out + out.err


class _Store:
    """``task_state_store`` as the Task SDK offers it: get/set of JSON values."""

    def __init__(self, **values: Any) -> None:
        self.values = dict(values)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        json.dumps(value)  # the SDK stores JSON
        self.values[key] = value


def _context(store: _Store, *, try_number: int = 2, max_tries: int = 1) -> dict[str, Any]:
    ti = SimpleNamespace(
        try_number=try_number,
        max_tries=max_tries,
        task=None,
        xcom_push=lambda key, value: None,
    )
    return {"task_state_store": store, "ti": ti}


def _submit_op(conn_id: str, prompt: str = "a stored fox") -> FluxSubmitOperator:
    return FluxSubmitOperator(task_id="submit", prompt=prompt, flux_conn_id=conn_id)


def test_a_stored_handle_without_fingerprint_is_not_reused(emulator, flux_conn, capfd):
    from airflow_flux.hooks import FluxHook

    # What an older version stored: the bare handle of a request that is still fine.
    old = FluxHook(flux_conn_id=flux_conn).submit({"prompt": "a stored fox"}).model_dump()
    store = _Store(**{STATE_KEY: old})
    handle = _submit_op(flux_conn).submit(_context(store))
    assert handle["request_id"] != old["request_id"]
    assert len(emulator.calls(kind="submit")) == 2
    assert f"Stored FLUX request {old['request_id']} has no request fingerprint" in _task_log(capfd)
    # The new record has one, so the next retry can reuse it.
    assert store.values[STATE_KEY]["identity"]["fingerprint"]
    again = _submit_op(flux_conn).submit(_context(store))
    assert again["request_id"] == handle["request_id"]
    assert len(emulator.calls(kind="submit")) == 2


def test_a_clear_submits_anew_a_retry_does_not(emulator, flux_conn, capfd):
    store = _Store()
    first = _submit_op(flux_conn).submit(_context(store, try_number=1, max_tries=1))
    assert store.values[STATE_KEY]["max_tries"] == 1 and store.values[STATE_KEY]["try_number"] == 1
    # An automatic retry keeps max_tries: the same request.
    retried = _submit_op(flux_conn).submit(_context(store, try_number=2, max_tries=1))
    assert retried["request_id"] == first["request_id"]
    # A user's clear raised max_tries (try_number + retries): run it again, even for the same input.
    cleared = _submit_op(flux_conn).submit(_context(store, try_number=3, max_tries=3))
    assert cleared["request_id"] != first["request_id"]
    assert "was submitted before this task was cleared (max_tries 1, now 3)" in _task_log(capfd)
    assert len(emulator.calls(kind="submit")) == 2


def test_a_different_connection_host_is_a_different_request(emulator, make_flux_conn, capfd):
    store = _Store()
    here = make_flux_conn(emulator.base_url)
    first = _submit_op(here).submit(_context(store))
    with FluxEmulator(queue_seconds=0.1, run_seconds=0.1, url_mode="fal") as other:
        there = make_flux_conn(other.base_url)
        moved = _submit_op(there).submit(_context(store))
        assert moved["request_id"] in other.jobs and first["request_id"] in emulator.jobs
    assert "(base_url differ)" in _task_log(capfd)


def test_reuse_request_false_always_submits(emulator, flux_conn):
    store = _Store()
    op = FluxSubmitOperator(task_id="submit", prompt="a fox", flux_conn_id=flux_conn, reuse_request=False)
    op.submit(_context(store))
    op.submit(_context(store))
    assert len(emulator.calls(kind="submit")) == 2


def test_the_handles_connection_drives_sensor_and_copy(dags, emulator, make_flux_conn, monkeypatch, s3):
    # flux_default is another account (another emulator, another token): any call there fails.
    with FluxEmulator() as other:
        make_flux_conn(other.base_url, conn_id="flux_default")
        make_flux_conn(emulator.base_url, conn_id="flux_team_a")
        dr = dags.get_dag("flux_test_team_connection").test(run_conf={"prompt": "a team fox", "bucket": s3.bucket})
        assert other.requests == []
    assert dr.state == "success", task_states(dr)
    handle = xcom(dr, "submit")
    assert handle["flux_conn_id"] == "flux_team_a"
    assert xcom(dr, "wait")["request_id"] == handle["request_id"]
    (uri,) = xcom(dr, "to_s3")
    key = uri.split("/", 3)[3]
    assert s3.head_object(Bucket=s3.bucket, Key=key)["Metadata"]["flux-request-id"] == handle["request_id"]
    assert len(emulator.calls(kind="result")) == 2  # the wait's and the copy's
