"""Submit, sensor and generate operators run by dag.test() against the emulator (real sockets)."""

from __future__ import annotations

import re

import pytest

from airflow_flux.emulator import FluxEmulator, Scenario
from airflow_flux.exceptions import FluxValidationError
from airflow_flux.operators import FluxGenerateOperator, FluxSubmitOperator
from tests.helpers import TOKEN, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


def _api_calls(emu: FluxEmulator) -> list[str]:
    return [r.kind for r in emu.requests if r.kind in ("submit", "status", "stream", "result", "cancel")]


def test_generate_in_one_task_costs_three_calls(dags, flux_default, capfd):
    dr = dags.get_dag("flux_test_generate").test(run_conf={"prompt": "a blue fox"})
    logs = capfd.readouterr()
    assert dr.state == "success", task_states(dr)
    result = xcom(dr, "generate")
    assert result["prompt"] == "a blue fox" and len(result["images"]) == 1
    assert _api_calls(flux_default) == ["submit", "stream", "result"]
    assert TOKEN not in logs.out + logs.err


def test_expand_over_five_prompts(dags, flux_default):
    dr = dags.get_dag("flux_test_expand").test()
    assert dr.state == "success", task_states(dr)
    prompts = sorted(xcom(dr, "wait", i)["prompt"] for i in range(5))
    assert prompts == [f"mapped prompt {i}" for i in range(5)]
    assert len(flux_default.calls(kind="submit")) == 5
    assert len(flux_default.calls(kind="result")) == 5


@pytest.mark.parametrize(
    ("prompt", "scenario"),
    [
        ("busy fox", Scenario(submit_errors=[429], retry_after=0.3)),
        ("flaky fox", Scenario(status_errors=[503, 503, "malformed"])),
        ("nostream fox", Scenario(stream="refuse")),
        ("dropped fox", Scenario(stream="drop", stream_drop_after=0.1, run_seconds=1.0)),
    ],
)
def test_transient_faults_are_survived_with_one_submit(dags, flux_default, prompt, scenario):
    flux_default.add_scenario(scenario, match=prompt)
    dr = dags.get_dag("flux_test_generate").test(run_conf={"prompt": prompt})
    assert dr.state == "success", task_states(dr)
    assert len(flux_default.jobs) == 1, "paid for more than one request"
    assert xcom(dr, "generate")["prompt"] == prompt


def test_retry_of_a_submit_reuses_the_request_in_flight(dags, flux_default, capfd):
    dr = dags.get_dag("flux_test_retry").test(run_conf={"prompt": "retried fox"})
    assert dr.state == "success", task_states(dr)
    assert len(flux_default.calls(kind="submit")) == 1, "the retry paid for a second request"
    (request_id,) = flux_default.jobs
    assert xcom(dr, "wait")["request_id"] == request_id
    # Said as ResumableJobMixin says it: reconnect (still queued or running) or already succeeded.
    assert re.search(
        rf"(Reconnecting to existing FLUX request {request_id} of try 1|FLUX request {request_id} of try 1 "
        "already completed successfully)",
        capfd.readouterr().out,
    )


def test_bad_values_known_at_parse_time_fail_the_dag_import():
    with pytest.raises(FluxValidationError, match=r"Task 'bad': .*num_images: must be a number from 1 to 4 \(got 5\)"):
        FluxSubmitOperator(task_id="bad", prompt="a fox", num_images=5)
    with pytest.raises(FluxValidationError, match="aspect_ratio: must be one of"):
        FluxGenerateOperator(task_id="bad2", prompt="{{ params.p }}", aspect_ratio="5:4")
    with pytest.raises(FluxValidationError, match="strength: unknown field"):
        FluxSubmitOperator(task_id="bad3", prompt="a fox", extra_input={"strength": 0.5})
    # Templated values are checked after rendering, not at parse time.
    FluxSubmitOperator(task_id="ok", prompt="{{ params.p }}", num_images="{{ params.n }}")
    # Other endpoints take free-form input.
    FluxSubmitOperator(task_id="ok2", prompt="x", endpoint="fal-ai/other", extra_input={"strength": 0.5})


def test_bad_rendered_value_fails_before_any_call(dags, flux_default, capfd):
    dr = dags.get_dag("flux_test_submit_sensor").test(run_conf={"prompt": "   "})
    assert dr.state == "failed"
    assert "prompt: must be a non-empty string" in capfd.readouterr().out
    assert flux_default.requests == []


def test_without_a_triggerer_the_worker_polls_with_the_same_hook(dags, flux_default):
    dr = dags.get_dag("flux_test_no_triggerer").test(run_conf={"prompt": "a polled fox"})
    assert dr.state == "success", task_states(dr)
    assert xcom(dr, "generate")["prompt"] == "a polled fox"
    assert xcom(dr, "poke")["request_id"] == xcom(dr, "submit")["request_id"]
    assert xcom(dr, "reschedule")["request_id"] == xcom(dr, "submit")["request_id"]
    assert flux_default.calls(kind="stream") == []
    # Polling backs off: far fewer status calls than 10 per second of waiting.
    assert len(flux_default.calls(kind="status")) < 20


def test_extra_links_open_the_gallery_not_the_api(dags, flux_default):
    from urllib.parse import quote

    from airflow_flux.xcom_keys import LINK_XCOM_KEY

    dr = dags.get_dag("flux_test_submit_sensor").test(run_conf={"prompt": "a linked fox"})
    assert dr.state == "success", task_states(dr)
    (ti,) = [ti for ti in dr.get_task_instances() if ti.task_id == "submit"]
    handle = xcom(dr, "submit")
    assert ti.xcom_pull(task_ids="submit", key=LINK_XCOM_KEY) == handle["response_url"]
    # Airflow stores the rendered links under their own keys at the end of the task. The API's
    # URLs answer 401 in a browser (no token), so both links open gallery pages instead.
    run = f"/flux-gallery/dags/flux_test_submit_sensor/runs/{quote(dr.run_id, safe='')}"
    assert ti.xcom_pull(task_ids="submit", key="_link_FluxRequestLink") == f"{run}?request_id={handle['request_id']}"
    assert ti.xcom_pull(task_ids="submit", key="_link_FluxGalleryLink") == run
