"""Gates: a job held IN_QUEUE or IN_PROGRESS until the test releases it (``Scenario.hold_queue``
/ ``hold_run``), or its submit answered only then (``hold_submit``), so a test sees each state
however slow the machine, instead of racing timers."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest
import requests

from airflow_flux.emulator import FluxEmulator, Scenario
from tests.emulator.test_edits import BLUE, EDIT, data_uri, encoded
from tests.emulator.test_edits import submit_ok as submit_edit
from tests.emulator.test_emulator import AUTH, rebase, result, status, submit, submit_ok, wait_completed

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def emu() -> Iterator[FluxEmulator]:
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.1, ping_interval=15.0) as emulator:
        yield emulator


def _status(emu: FluxEmulator, sub: dict[str, Any]) -> dict[str, Any]:
    return status(emu, sub).json()


def _eventually(emu: FluxEmulator, sub: dict[str, Any], wanted: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (body := _status(emu, sub))["status"] != wanted:
        assert time.monotonic() < deadline, body
        time.sleep(0.01)
    return body


def test_a_job_waits_at_each_gate_until_released(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(hold_queue="queued", hold_run="running"), match="held")
    sub = submit_ok(emu, prompt="a held fox")
    time.sleep(0.3)  # twice its queue and run times: the gates, not the clock, hold it
    assert _status(emu, sub)["status"] == "IN_QUEUE"
    assert emu.held() == [sub["request_id"]] and emu.held("queued") == [sub["request_id"]]
    assert emu.release("queued") == 1
    running = _eventually(emu, sub, "IN_PROGRESS")
    assert running["logs"][0]["message"] == "Starting generation"
    time.sleep(0.3)
    assert _status(emu, sub)["status"] == "IN_PROGRESS"
    assert result(emu, sub).status_code == 400
    assert emu.held("running") == [sub["request_id"]]
    assert emu.release("running") == 1
    done = wait_completed(emu, sub)
    assert done["metrics"]["inference_time"] >= 0.3 and "error" not in done
    assert result(emu, sub).status_code == 200
    assert emu.held() == []
    # What the client was told, in order, for this request.
    told = emu.reported(sub["request_id"], kind="status")
    order = ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert told[0] == "IN_QUEUE" and "IN_PROGRESS" in told and told[-1] == "COMPLETED", told
    assert told == sorted(told, key=order.index), told
    assert emu.reported(kind="result") == []  # a result call reports no status


def test_a_released_gate_stays_open_until_held_again(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(hold_queue="gate", run_seconds=0), match="gated")
    first = submit_ok(emu, prompt="gated fox 1")
    assert emu.release("gate") == 1
    wait_completed(emu, first)
    second = submit_ok(emu, prompt="gated fox 2")  # the gate is open: it passes
    wait_completed(emu, second)
    emu.hold("gate")
    third = submit_ok(emu, prompt="gated fox 3")
    time.sleep(0.2)
    assert _status(emu, third)["status"] == "IN_QUEUE"
    assert emu.release("gate") == 1
    wait_completed(emu, third)
    assert emu.release("nobody") == 0  # releasing a gate no job waits at is a no-op


def test_a_stream_moves_on_the_moment_its_gate_opens(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(hold_run="running"), match="streamed")
    sub = submit_ok(emu, prompt="a streamed fox")
    url = rebase(emu, sub["status_url"]) + "/stream"
    with requests.get(url, headers=AUTH, stream=True, timeout=10) as resp:
        seen = []
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                seen.append(line.split('"status": "')[1].split('"')[0])
                if seen[-1] == "IN_PROGRESS":
                    released = time.monotonic()
                    emu.release("running")
        assert time.monotonic() - released < 5  # woken by the release, not by the 15 s ping
    assert seen[0] == "IN_QUEUE" and seen[-2:] == ["IN_PROGRESS", "COMPLETED"]
    assert emu.reported(sub["request_id"], kind="stream") == seen


def test_a_held_edit_fetches_its_input_only_once_released(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(hold_queue="queued"), match="edit")
    sub = submit_edit(emu, EDIT, prompt="an edit", image_url=data_uri(encoded(BLUE, (64, 64))))
    time.sleep(0.2)
    job = emu.jobs[sub["request_id"]]
    assert job.input_fetches == [] and _status(emu, sub)["status"] == "IN_QUEUE"
    emu.release("queued")
    wait_completed(emu, sub)
    assert len(emu.jobs[sub["request_id"]].input_fetches) == 1


def test_a_request_timeout_ends_a_job_held_in_the_queue(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(hold_queue="queued"), match="late")
    late = submit(emu, {**AUTH, "X-Fal-Request-Timeout": "1.5"}, prompt="late fox").json()
    on_time = submit(emu, {**AUTH, "X-Fal-Request-Timeout": "30"}, prompt="late fox too").json()
    assert wait_completed(emu, late)["error_type"] == "request_timeout"
    assert emu.release("queued") == 1  # the timed-out one is over; the other leaves the queue
    assert "error" not in wait_completed(emu, on_time)


def test_gates_under_a_concurrency_limit_and_over_http() -> None:
    with FluxEmulator(queue_seconds=0, run_seconds=0.05, concurrency=1) as emu:
        emu.add_scenario(Scenario(hold_run="slot"), match="first")
        first = submit_ok(emu, prompt="first fox")
        second = submit_ok(emu, prompt="second fox")
        _eventually(emu, first, "IN_PROGRESS")
        time.sleep(0.2)
        # The held job keeps the account's only slot: the next one waits its turn.
        waiting = _status(emu, second)
        assert (waiting["status"], waiting["queue_position"]) == ("IN_QUEUE", 0)
        jobs = requests.get(f"{emu.base_url}/_emulator/jobs", timeout=5).json()
        assert [j["held_at"] for j in jobs] == ["slot", None]
        gate = requests.post(f"{emu.base_url}/_emulator/gates/slot/release", timeout=5)
        assert gate.json() == {"ok": True, "released": 1}
        wait_completed(emu, first)
        wait_completed(emu, second)
        assert emu.max_running("Key test-key") == 1
        assert requests.post(f"{emu.base_url}/_emulator/gates/slot/hold", timeout=5).json() == {"ok": True}
        third = submit_ok(emu, prompt="first fox again")
        _eventually(emu, third, "IN_PROGRESS")
        assert emu.held("slot") == [third["request_id"]]
        emu.release("slot")


def test_gate_names_are_checked() -> None:
    with pytest.raises(ValueError, match="gate names"):
        Scenario(hold_queue="")
    with pytest.raises(ValueError, match="gate names"):
        Scenario.from_dict({"hold_run": 3})
    with pytest.raises(ValueError, match="gate names"):
        Scenario(hold_submit="")


def _until_held(emu: FluxEmulator, gate: str, timeout: float = 10) -> None:
    """Until a submit's answer waits at ``gate`` (it was sent from another thread)."""
    deadline = time.monotonic() + timeout
    while not emu.held(gate):
        assert time.monotonic() < deadline, f"nothing held at {gate!r}"
        time.sleep(0.01)


def test_a_held_submit_is_paid_and_answered_when_released(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(hold_submit="answers"), match="slow")
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(submit, emu, prompt="a slow fox")
        # The job is accepted (paid) as the submit arrives; its answer waits for the gate.
        _until_held(emu, "answers")
        [request_id] = emu.held("answers")
        assert not held.done() and emu.jobs[request_id].input["prompt"] == "a slow fox"
        # Other submits are answered meanwhile.
        assert submit(emu, prompt="a quick fox").status_code == 200
        assert emu.release("answers") == 1
        answer = held.result(timeout=10)
    assert answer.status_code == 200 and answer.json()["request_id"] == request_id
    assert emu.held() == []
    wait_completed(emu, answer.json())
    # Released: later submits pass, until hold closes the gate again.
    assert submit(emu, prompt="another slow fox").status_code == 200
    emu.hold("answers")
    with ThreadPoolExecutor(max_workers=1) as pool:
        again = pool.submit(submit, emu, prompt="a last slow fox")
        _until_held(emu, "answers")
        # A reset lets a held answer go rather than leave its client waiting forever.
        emu.reset()
        assert again.result(timeout=10).status_code == 200
