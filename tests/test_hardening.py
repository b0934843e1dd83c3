"""Fault, abuse and recovery cases: real DAG runs against the emulator and moto, one case per
row of the README's failure-semantics table, each asserting the outcome and the API calls.

Rows covered elsewhere (same style, real DAG runs): stream drop and COMPLETED-with-error
(tests/operators), never completing / timeout and cancel (tests/operators), retry while in
flight (tests/operators), broken download (tests/transfers), triggerer restart
(tests/system), token in DB rows and log files (tests/system).
"""

from __future__ import annotations

import itertools
import json

import pytest

from airflow_flux.emulator import FluxEmulator, Scenario
from tests.helpers import TOKEN, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

S3_DEFAULTS = {
    "num_images": 1,
    "sync_mode": False,
    "nsfw": "skip",
    "prefix": "",
    "key_template": "{request_id}_{index}.{ext}",
    "aspect_ratio": "1:1",
}


def _to_s3(dags, s3, prompt: str):
    return dags.get_dag("flux_test_to_s3").test(run_conf={**S3_DEFAULTS, "prompt": prompt, "bucket": s3.bucket})


def _gaps(calls) -> list[float]:
    return [b.time - a.time for a, b in itertools.pairwise(calls)]


def test_submit_429_waits_as_told_then_submits_once(dags, flux_default):
    flux_default.add_scenario(Scenario(submit_errors=[429], retry_after=1.0), match="busy")
    dr = dags.get_dag("flux_test_generate").test(run_conf={"prompt": "busy fox"})
    assert dr.state == "success", task_states(dr)
    submits = flux_default.calls(kind="submit")
    assert [s.status for s in submits] == [429, 200]
    assert _gaps(submits)[0] >= 1.0, "Retry-After was not honoured"
    assert len(flux_default.jobs) == 1


def test_status_503_twice_then_malformed_is_survived_without_a_hot_loop(dags, flux_default):
    # The stream refused, so the trigger polls and meets every fault on the status endpoint.
    flux_default.add_scenario(
        Scenario(stream="refuse", status_errors=[503, 503, "malformed"], retry_after=0.3), match="flaky"
    )
    dr = dags.get_dag("flux_test_generate").test(run_conf={"prompt": "flaky fox"})
    assert dr.state == "success", task_states(dr)
    statuses = flux_default.calls(kind="status")
    assert [s.status for s in statuses[:3]] == [503, 503, 200]
    assert min(_gaps(statuses)) >= 0.25, f"status calls too close together: {_gaps(statuses)}"
    assert len(flux_default.jobs) == 1


@pytest.mark.parametrize(
    ("prompt", "scenario", "expected"),
    [
        ("policy fox", Scenario(result_error_always=422), "content_policy_violation"),
        ("down fox", Scenario(result_error_always=503, retry_after=0.1), "HTTP 503 (runner_disconnected)"),
        ("expired fox", Scenario(result_expired=True), "fal keeps results for 1 hour"),
    ],
)
def test_result_failures_fail_the_wait_and_write_nothing(dags, flux_default, s3, capfd, prompt, scenario, expected):
    flux_default.add_scenario(scenario, match=prompt)
    dr = _to_s3(dags, s3, prompt)
    out = capfd.readouterr().out
    assert dr.state == "failed"
    assert task_states(dr) == {"submit": "success", "wait": "failed", "to_s3": "upstream_failed"}
    assert expected in out
    assert s3.list_objects_v2(Bucket=s3.bucket).get("KeyCount") == 0
    assert len(flux_default.calls(kind="submit")) == 1


def test_urls_on_a_foreign_host_never_get_the_token(dags, emulator, monkeypatch, capfd):
    with FluxEmulator(queue_seconds=0.1, run_seconds=0.1) as foreign:
        emulator.url_mode = foreign.base_url  # the API returns URLs on another host
        conn = {"conn_type": "flux", "host": emulator.base_url, "password": TOKEN, "extra": {"rebase_urls": False}}
        monkeypatch.setenv("AIRFLOW_CONN_FLUX_DEFAULT", json.dumps(conn))
        dr = dags.get_dag("flux_test_submit_sensor").test(run_conf={"prompt": "a fox"})
        assert dr.state == "failed"
        assert task_states(dr) == {"submit": "success", "wait": "failed"}
        assert "Refusing to send the API token" in capfd.readouterr().out
        assert foreign.requests == []
        # The request id is not lost: the submit's handle is in XCom for a manual follow-up.
        assert xcom(dr, "submit")["request_id"] in emulator.jobs


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"prompt": ""}, "prompt: must be a non-empty string"),
        ({"num_images": 0}, "num_images: must be a number from 1 to 4 (got 0)"),
        ({"num_images": 5}, "num_images: must be a number from 1 to 4 (got 5)"),
        ({"guidance_scale": 0.5}, "guidance_scale: must be a number from 1 to 20 (got 0.5)"),
        ({"guidance_scale": 25}, "guidance_scale: must be a number from 1 to 20 (got 25)"),
        ({"aspect_ratio": "5:4"}, "aspect_ratio: must be one of '21:9', '16:9', '4:3', '3:2', '1:1', '2:3', '3:4'"),
        ({"output_format": "gif"}, "output_format: must be one of 'jpeg', 'png' (got 'gif')"),
        ({"safety_tolerance": "7"}, "safety_tolerance: must be one of '1', '2', '3', '4', '5', '6' (got '7')"),
        ({"extra": {"image_url": "https://x/y.png"}}, "image_url: unknown field for endpoint"),
    ],
)
def test_bad_input_is_refused_before_any_call(dags, flux_default, capfd, bad, message):
    dr = dags.get_dag("flux_test_templated_input").test(run_conf={"input": {"prompt": "a fox", **bad}})
    assert dr.state == "failed"
    assert message in capfd.readouterr().out
    assert flux_default.requests == [], "a call was made"
