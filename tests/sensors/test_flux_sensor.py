"""FluxStatusSensor run by dag.test() against the emulator (real sockets), and its wait settings."""

from __future__ import annotations

import pytest

from airflow_flux.emulator import FluxEmulator, Scenario
from airflow_flux.exceptions import FluxError, FluxRequestFailedError
from airflow_flux.operators import FluxGenerateOperator
from airflow_flux.operators.wait import default_deferrable
from airflow_flux.sensors import FluxStatusSensor
from tests.helpers import TOKEN, releasing, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")


def _api_calls(emu: FluxEmulator) -> list[str]:
    return [r.kind for r in emu.requests if r.kind in ("submit", "status", "stream", "result", "cancel")]


def _task_log(capfd: pytest.CaptureFixture[str]) -> str:
    out = capfd.readouterr()
    return out.out + out.err


def test_submit_then_deferred_sensor(dags, flux_default, capfd):
    # Held until the trigger's stream has shown each state: the sensor's first check finds the
    # request queued (so it defers), and the stream sees it run, however slow the machine.
    flux_default.add_scenario(Scenario(hold_queue="queued", hold_run="running"), match="a red fox")
    with releasing(
        flux_default,
        ("queued", lambda: "IN_QUEUE" in flux_default.reported(kind="stream")),
        ("running", lambda: "IN_PROGRESS" in flux_default.reported(kind="stream")),
    ):
        dr = dags.get_dag("flux_test_submit_sensor").test(run_conf={"prompt": "a red fox"})
    logs = capfd.readouterr()
    assert dr.state == "success", task_states(dr)

    handle = xcom(dr, "submit")
    result = xcom(dr, "wait")
    assert set(handle) == {
        "request_id",
        "status_url",
        "response_url",
        "cancel_url",
        "endpoint",
        "flux_conn_id",
        "inputs",
    }
    assert handle["flux_conn_id"] == "flux_default"
    assert result["request_id"] == handle["request_id"]
    assert result["prompt"] == "a red fox" and result["seed"] == 11
    assert result["images"][0]["width"] == 1392 and result["has_nsfw_concepts"] == [False]

    # submit + one synchronous check (it found the request queued) + the SSE stream + the result.
    assert _api_calls(flux_default) == ["submit", "status", "stream", "result"]
    assert flux_default.reported(kind="status") == ["IN_QUEUE"]
    assert TOKEN not in logs.out + logs.err
    assert f"FLUX request {handle['request_id']} is IN_PROGRESS" in logs.out + logs.err


@pytest.mark.parametrize(
    ("prompt", "scenario", "expected"),
    [
        (
            "broken fox",
            Scenario(complete_error={"error": "Internal error during inference", "error_type": "internal_error"}),
            ["internal_error", "Internal error during inference"],
        ),
        (
            "policy fox",
            Scenario(result_error_always=422),
            ["content_policy_violation", "flagged by a content checker"],
        ),
    ],
)
def test_remote_failures_fail_the_task_with_the_api_reason(dags, flux_default, capfd, prompt, scenario, expected):
    flux_default.add_scenario(scenario, match=prompt)
    dr = dags.get_dag("flux_test_submit_sensor").test(run_conf={"prompt": prompt})
    logs = capfd.readouterr().out
    assert dr.state == "failed"
    assert task_states(dr) == {"submit": "success", "wait": "failed"}
    for text in expected:
        assert text in logs
    assert len(flux_default.calls(kind="submit")) == 1


def test_never_completing_request_times_out_and_is_cancelled(dags, flux_default):
    flux_default.add_scenario(Scenario(never_complete=True), match="stuck fox")
    dr = dags.get_dag("flux_test_timeout").test(run_conf={"prompt": "stuck fox"})
    assert task_states(dr) == {"submit": "success", "wait": "failed", "submit_soft": "success", "wait_soft": "skipped"}
    # Each timed-out wait cancelled its own request, once.
    assert sorted(c.request_id for c in flux_default.calls(kind="cancel")) == sorted(flux_default.jobs)
    assert len(flux_default.calls(kind="submit")) == 2


def test_api_logs_false_reaches_the_trigger_and_the_worker_poll(flux_conn, emulator):
    from airflow.providers.common.compat.sdk import TaskDeferred

    from airflow_flux.hooks import FluxHook
    from airflow_flux.sensors import FluxStatusSensor

    handle = FluxHook(flux_conn_id=flux_conn).submit({"prompt": "a quiet fox"}).model_dump()
    sensor = FluxStatusSensor(task_id="wait", request=handle, flux_conn_id=flux_conn, api_logs=False)
    with pytest.raises(TaskDeferred) as deferred:
        sensor._defer_wait(handle)
    assert deferred.value.trigger.serialize()[1]["api_logs"] is False
    assert FluxGenerateOperator(task_id="g", prompt="x", api_logs=False).api_logs is False

    emulator.clear_requests()
    result = sensor._wait_blocking(handle)  # the non-deferrable path, real HTTP
    assert result["request_id"] == handle["request_id"]
    asked = [r.query for r in emulator.requests if r.kind == "status"]
    assert asked and all(q == "logs=0" for q in asked), asked


def test_an_explicit_connection_wins_over_the_handles_with_a_warning(emulator, make_flux_conn, capfd):
    from airflow_flux.hooks import FluxHook

    team_a = make_flux_conn(emulator.base_url)
    team_b = make_flux_conn(emulator.base_url)
    handle = FluxHook(flux_conn_id=team_a).submit({"prompt": "a fox"}).model_dump()
    implicit = FluxStatusSensor(task_id="w1", request=handle)
    assert implicit.handle["flux_conn_id"] == team_a and implicit.hook.flux_conn_id == team_a
    explicit = FluxStatusSensor(task_id="w2", request=handle, flux_conn_id=team_b)
    explicit.handle  # noqa: B018
    assert explicit.hook.flux_conn_id == team_b
    assert f"was submitted with connection {team_a!r}; using flux_conn_id={team_b!r}" in _task_log(capfd)


@pytest.mark.parametrize(
    ("cfg", "env", "expected"),
    [
        (None, None, True),  # nothing set: a wait should not hold a worker
        ("False", None, True),  # what every generated airflow.cfg says: Airflow's default, not a choice
        ("True", None, True),
        (None, "False", False),  # the deployment's explicit choice
        ("True", "False", False),
        (None, "True", True),
    ],
)
def test_deferrable_follows_the_deployments_default_deferrable(monkeypatch, cfg, env, expected):
    from airflow.providers.common.compat.sdk import conf

    monkeypatch.delenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", raising=False)
    before = conf.get("operators", "default_deferrable")
    try:
        if cfg is not None:
            conf.set("operators", "default_deferrable", cfg)  # as airflow.cfg would say it
        if env is not None:
            monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", env)
        assert default_deferrable() is expected
    finally:
        conf.set("operators", "default_deferrable", before)


def test_execute_complete_reads_a_typed_event_and_refuses_anything_else(emulator, flux_conn):
    from airflow_flux.hooks import FluxHook

    handle = FluxHook(flux_conn_id=flux_conn).submit({"prompt": "an evented fox"}).model_dump()
    sensor = FluxStatusSensor(task_id="w", request=handle)
    failed = {
        "status": "failed",
        "message": "FLUX request r failed: internal_error: boom",
        "request_id": handle["request_id"],
        "handle": handle,
        "error": "boom",
        "error_type": "internal_error",
    }
    with pytest.raises(FluxRequestFailedError, match="internal_error: boom") as info:
        sensor.execute_complete({}, failed)
    assert info.value.error_type == "internal_error" and info.value.request_id == handle["request_id"]
    # A payload that is not the trigger's event: a clear error, not a KeyError.
    with pytest.raises(FluxError, match="Unexpected event from the FLUX trigger"):
        sensor.execute_complete({}, {"status": "success"})
    with pytest.raises(FluxError, match="Unexpected event from the FLUX trigger"):
        sensor.execute_complete({}, {**failed, "status": "FAILED"})
