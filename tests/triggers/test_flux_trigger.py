"""FluxStatusTrigger run as the triggerer runs it (an asyncio loop) against the emulator."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from airflow.providers.common.compat.module_loading import import_string

from airflow_flux.emulator import Scenario
from airflow_flux.hooks import FluxHook
from airflow_flux.hooks.polling import next_poll_interval
from airflow_flux.triggers import FluxStatusTrigger
from tests.helpers import FAST_RETRY, TOKEN, releasing


def _submit(conn_id: str, prompt: str) -> dict:
    return FluxHook(flux_conn_id=conn_id, retry_policy=FAST_RETRY).submit({"prompt": prompt}).model_dump()


async def _run(trigger: FluxStatusTrigger) -> list[dict]:
    return [event.payload async for event in trigger.run()]


@pytest.fixture
def fast_hook(monkeypatch):
    """Triggers build their own hook: give it the fast test retry policy (same rules)."""
    monkeypatch.setattr(
        FluxStatusTrigger, "_hook", lambda self: FluxHook(flux_conn_id=self.flux_conn_id, retry_policy=FAST_RETRY)
    )


def test_serialized_trigger_holds_no_token_and_round_trips(emulator, flux_conn):
    handle = _submit(flux_conn, "a fox")
    trigger = FluxStatusTrigger(flux_conn_id=flux_conn, handle={**handle, "junk": "dropped"}, end_time=123.0)
    classpath, kwargs = trigger.serialize()
    assert TOKEN not in json.dumps(kwargs) + repr(trigger)
    assert kwargs["handle"] == handle
    clone = import_string(classpath)(**kwargs)
    assert clone.serialize() == (classpath, kwargs)


async def test_stream_path_ends_with_the_result_in_two_calls(emulator, flux_conn, capfd):
    # Each state held until the stream has shown it: the log must have IN_PROGRESS, once.
    emulator.add_scenario(Scenario(hold_queue="queued", hold_run="running"), match="a streaming fox")
    handle = _submit(flux_conn, "a streaming fox")
    emulator.clear_requests()
    with releasing(
        emulator,
        ("queued", lambda: "IN_QUEUE" in emulator.reported(kind="stream")),
        ("running", lambda: "IN_PROGRESS" in emulator.reported(kind="stream")),
    ):
        (event,) = await _run(FluxStatusTrigger(flux_conn_id=flux_conn, handle=handle, end_time=time.time() + 60))
    assert event["status"] == "success"
    assert event["result"]["prompt"] == "a streaming fox"
    assert event["result"]["request_id"] == handle["request_id"]
    assert [r.kind for r in emulator.requests] == ["stream", "result"]
    # Progress in the log: each state once, the API's own log lines, and no flood.
    out = capfd.readouterr()
    text = out.out + out.err  # trigger logs are structlog lines, as in the triggerer
    assert f"FLUX request {handle['request_id']} is IN_PROGRESS" in text
    assert f"FLUX request {handle['request_id']} is COMPLETED" in text
    assert text.count(" is IN_PROGRESS") == 1
    assert f"FLUX request {handle['request_id']} | " in text
    assert TOKEN not in text


async def test_failed_completion_and_result_errors_become_failed_events(emulator, flux_conn):
    emulator.add_scenario(
        Scenario(complete_error={"error": "GPU fell over", "error_type": "internal_error"}), match="broken"
    )
    emulator.add_scenario(Scenario(result_error_always=422), match="policy")
    broken = FluxStatusTrigger(flux_conn_id=flux_conn, handle=_submit(flux_conn, "broken fox"))
    policy = FluxStatusTrigger(flux_conn_id=flux_conn, handle=_submit(flux_conn, "policy fox"))
    (b,), (p,) = await asyncio.gather(_run(broken), _run(policy))
    assert (b["status"], b["error_type"], b["error"]) == ("failed", "internal_error", "GPU fell over")
    assert (p["status"], p["error_type"], p["status_code"]) == ("failed", "content_policy_violation", 422)
    assert "flagged by a content checker" in p["message"]


async def test_deadline_survives_recreation_of_the_trigger(emulator, flux_conn):
    emulator.add_scenario(Scenario(never_complete=True), match="stuck")
    end_time = time.time() + 3
    trigger = FluxStatusTrigger(flux_conn_id=flux_conn, handle=_submit(flux_conn, "stuck fox"), end_time=end_time)
    classpath, kwargs = trigger.serialize()
    await asyncio.sleep(1.5)
    # A triggerer restart re-creates the trigger from its row: the wall-clock deadline still holds,
    # not the 3 s it had when created (which would end it 3 s after the re-creation).
    started = time.monotonic()
    (event,) = await _run(import_string(classpath)(**kwargs))
    assert event["status"] == "timeout"
    assert time.time() >= end_time, "timed out before its deadline"
    assert time.monotonic() - started < 2.7
    assert "did not complete within the timeout" in event["message"]
    assert emulator.calls(kind="cancel") == [], "run() must not cancel: that is the task's decision"


async def test_on_kill_cancels_the_remote_request(emulator, flux_conn):
    emulator.add_scenario(Scenario(never_complete=True), match="stuck")
    handle = _submit(flux_conn, "stuck fox")
    trigger = FluxStatusTrigger(flux_conn_id=flux_conn, handle=handle)
    await trigger.on_kill()
    (cancel,) = emulator.calls(kind="cancel")
    assert cancel.request_id == handle["request_id"]
    assert emulator.jobs[handle["request_id"]].cancelled
    await FluxStatusTrigger(flux_conn_id=flux_conn, handle=handle, cancel_on_kill=False).on_kill()
    assert len(emulator.calls(kind="cancel")) == 1


async def test_transient_status_failures_are_bounded(emulator, flux_conn, fast_hook):
    emulator.add_scenario(
        Scenario(stream="refuse", status_errors=[503] * 100, retry_after=0.01, never_complete=True), match="down"
    )
    handle = _submit(flux_conn, "down fox")
    trigger = FluxStatusTrigger(
        flux_conn_id=flux_conn, handle=handle, poll_interval=0.01, max_poll_interval=0.05, max_consecutive_failures=3
    )
    (event,) = await _run(trigger)
    assert event["status"] == "error"
    assert "after 3 failed status checks in a row" in event["message"]
    assert event["status_code"] == 503
    assert len(emulator.calls(kind="status")) == 3 * FAST_RETRY.max_attempts


async def test_unknown_request_is_an_error_not_a_wait(emulator, flux_conn):
    handle = FluxHook(flux_conn_id=flux_conn).resolve_handle("00000000-0000-0000-0000-000000000000").model_dump()
    (event,) = await _run(FluxStatusTrigger(flux_conn_id=flux_conn, handle=handle, poll_interval=0.01))
    assert event["status"] == "error"
    assert event["status_code"] == 404


@pytest.mark.parametrize("stream", ["ok", "refuse"])
async def test_api_logs_false_asks_for_no_api_log_lines(emulator, flux_conn, capfd, stream):
    emulator.add_scenario(Scenario(stream=stream, run_seconds=0.3), match="quiet")
    handle = _submit(flux_conn, "a quiet fox")
    emulator.clear_requests()
    trigger = FluxStatusTrigger(flux_conn_id=flux_conn, handle=handle, api_logs=False, poll_interval=0.05)
    assert trigger.serialize()[1]["api_logs"] is False
    (event,) = await _run(trigger)
    assert event["status"] == "success"
    asked = [r.query for r in emulator.requests if r.kind in ("stream", "status")]
    assert asked and all(q == "logs=0" for q in asked), asked
    text = "".join(capfd.readouterr())
    assert f"FLUX request {handle['request_id']} is COMPLETED" in text
    assert f"FLUX request {handle['request_id']} | " not in text


def test_poll_interval_grows_with_the_wait_but_stays_within_a_tenth_of_it():
    elapsed, intervals = 0.0, []
    for polls in range(200):
        interval = next_poll_interval(polls, elapsed, initial=1, maximum=30)
        # A completion is noticed at most one interval late: bounded by 10 % of the wait.
        assert interval <= max(1.0, 0.1 * elapsed), (polls, elapsed, interval)
        intervals.append(interval)
        elapsed += interval
    assert intervals[0] == 1
    assert intervals == sorted(intervals)
    assert intervals[-1] == 30, "a long wait polls at most every max_poll_interval"
    assert next_poll_interval(0, 600, initial=1, maximum=30) == 1, "grows per poll, not in one jump"
    assert next_poll_interval(10, 600, initial=1, maximum=30) == 30, "a long wait polls rarely"
    assert next_poll_interval(0, 0, initial=1, maximum=30, queue_position=20) == 10, "far back in the queue"


@pytest.mark.timeout(90)
async def test_polling_fallback_for_a_30s_generation_is_at_most_a_tenth_late_in_23_calls(make_flux_conn):
    # 30 s of real time (the schedule over longer waits: the test above); 22 polls by the
    # schedule, one more allowed for the first stream attempt's timing.
    from airflow_flux.emulator import FluxEmulator

    with FluxEmulator(queue_seconds=0, run_seconds=30) as emu:
        emu.add_scenario(Scenario(stream="refuse"), match=None)
        conn_id = make_flux_conn(emu.base_url)
        handle = _submit(conn_id, "a slow fox")
        (event,) = await _run(FluxStatusTrigger(flux_conn_id=conn_id, handle=handle))
        seen = time.time()
        assert event["status"] == "success"
        assert len(emu.calls(kind="stream")) == 1, "the stream is tried once, then polling"
        status_calls = len(emu.calls(kind="status"))
        assert status_calls <= 23, status_calls
        completed = emu.complete_time(handle["request_id"])
        assert completed is not None
        # 10 % of the 30 s wait, plus slack for the result call and a loaded CI machine (the
        # old schedule, growth by poll count alone, was about 15 s late on a 60 s wait).
        assert seen - completed <= 3 + 3, seen - completed


async def test_result_fetches_in_flight_are_bounded_per_loop(emulator, flux_conn, monkeypatch):
    from airflow_flux.hooks import shared

    # The bound is the event loop's, shared by every trigger on it (and the batch trigger).
    monkeypatch.setattr(shared, "RESULT_FETCH_CONCURRENCY", 2)
    # All 8 held running until every stream has shown it: then they complete at one moment.
    emulator.add_scenario(Scenario(hold_run="burst"), match="a burst fox")
    handles = [_submit(flux_conn, f"a burst fox {i}") for i in range(8)]
    in_flight, most, finished = 0, 0, 0
    real = FluxHook.aget_result

    changed = asyncio.Condition()

    async def counting(self, handle):
        nonlocal in_flight, most, finished
        async with changed:
            in_flight += 1
            most = max(most, in_flight)
            changed.notify_all()
        try:
            # Each fetch waits for a second one in flight (unless no other is left): with the
            # bound, 2 at most get here at once; without it, all 8 would pile up.
            async with changed:
                await asyncio.wait_for(
                    changed.wait_for(lambda: in_flight >= 2 or finished + in_flight >= len(handles)), 30
                )
            await asyncio.sleep(0.05)  # room for more to pile up, were there no bound
            return await real(self, handle)
        finally:
            async with changed:
                in_flight -= 1
                finished += 1
                changed.notify_all()

    def all_running() -> bool:
        return len({r.request_id for r in emulator.calls(kind="stream") if "IN_PROGRESS" in r.statuses}) == 8

    monkeypatch.setattr(FluxHook, "aget_result", counting)
    triggers = [FluxStatusTrigger(flux_conn_id=flux_conn, handle=h) for h in handles]
    with releasing(emulator, ("burst", all_running)):
        events = await asyncio.gather(*(_run(t) for t in triggers))
    assert [e["status"] for (e,) in events] == ["success"] * 8
    assert sorted(e["request_id"] for (e,) in events) == sorted(h["request_id"] for h in handles)
    assert most == 2
