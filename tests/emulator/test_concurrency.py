"""The emulator's concurrency limit per account (``FluxEmulator(concurrency=N)``), as fal's.

Over real sockets. The timeline is read from ``/_emulator/jobs`` (``started_at`` and
``completed_at`` are the job clock's own times, so they can be compared exactly), statuses
are polled and streamed as a client would. Timing margins are wide: nothing here depends on
the machine being fast beyond a few submits taking less than a second.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
import requests
from PIL import Image

from airflow_flux.emulator import FluxEmulator, Scenario
from tests.emulator.test_emulator import AUTH, MODEL, REPO, rebase, result, status, submit, wait_completed

if TYPE_CHECKING:
    from collections.abc import Callable

pytestmark = pytest.mark.timeout(60)

ALICE = {"Authorization": "Key alice"}
BOB = {"Authorization": "Key bob"}
EDIT = "/fal-ai/flux-pro/kontext"


# --------------------------------------------------------------------------- helpers


def submit_ok(emu: FluxEmulator, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    resp = submit(emu, headers, **body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def jobs_by_id(base_url: str) -> dict[str, dict[str, Any]]:
    rows = requests.get(base_url + "/_emulator/jobs", timeout=10).json()
    return {row["request_id"]: row for row in rows}


def rows_of(emu: FluxEmulator, subs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = jobs_by_id(emu.base_url)
    return [rows[sub["request_id"]] for sub in subs]


def state(emu: FluxEmulator, sub: dict[str, Any]) -> dict[str, Any]:
    resp = status(emu, sub)
    assert resp.status_code in (200, 202), resp.text
    return resp.json()


def eventually(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """Poll ``check`` until it returns something truthy (generous timeout for loaded machines)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def wait_running(emu: FluxEmulator, sub: dict[str, Any]) -> None:
    eventually(lambda: state(emu, sub)["status"] == "IN_PROGRESS")


def wait_started(emu: FluxEmulator, sub: dict[str, Any]) -> None:
    """Until it left the queue (it may be over already on a slow machine)."""
    eventually(lambda: state(emu, sub)["status"] != "IN_QUEUE")


def peak(rows: list[dict[str, Any]]) -> int:
    """Most jobs running at once, from their [started_at, completed_at) intervals."""
    events = [(r["started_at"], 1) for r in rows if r["started_at"] is not None]
    events += [(r["completed_at"], -1) for r in rows if r["started_at"] is not None and r["completed_at"] is not None]
    running = best = 0
    for _, delta in sorted(events):  # at equal times, ends first
        running += delta
        best = max(best, running)
    return best


def starts_when_freed(row: dict[str, Any], freed_at: float, queue_seconds: float = 0.05) -> bool:
    """Whether the job started the moment a slot freed, or at the end of its own queue time if
    that came later (the start the schedule gives it: exact, not a measured time)."""
    expected = max(freed_at, row["submitted_at"] + queue_seconds)
    assert row["started_at"] == pytest.approx(expected, abs=1e-6), row
    return True


def cancel(emu: FluxEmulator, sub: dict[str, Any]) -> None:
    resp = requests.put(rebase(emu, sub["cancel_url"]), headers=AUTH, timeout=10)
    assert (resp.status_code, resp.json()) == (202, {"status": "CANCELLATION_REQUESTED"})


class Stream:
    """Reads a job's SSE status stream in a thread."""

    def __init__(self, status_url: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.first = threading.Event()
        self.done = threading.Event()
        url = status_url + "/stream"

        def run() -> None:
            try:
                with requests.get(url, headers=AUTH, stream=True, timeout=30) as resp:
                    for line in resp.iter_lines(decode_unicode=True):
                        if line.startswith("data: "):
                            self.events.append(json.loads(line[len("data: ") :]))
                            self.first.set()
            finally:
                self.done.set()

        threading.Thread(target=run, daemon=True).start()
        assert self.first.wait(15), "no first event"

    def finish(self) -> list[dict[str, Any]]:
        assert self.done.wait(30), "stream did not end"
        return self.events

    def positions(self) -> list[int]:
        return [e["queue_position"] for e in self.events if e["status"] == "IN_QUEUE"]


def stream(emu: FluxEmulator, sub: dict[str, Any]) -> Stream:
    return Stream(rebase(emu, sub["status_url"]))


# --------------------------------------------------------------------------- the limit


def test_nine_jobs_run_three_at_a_time_in_submit_order() -> None:
    with FluxEmulator(queue_seconds=0.05, run_seconds=1.0, concurrency=3) as emu:
        assert emu.concurrency == 3
        subs = [submit_ok(emu, prompt=f"job {i}") for i in range(9)]
        last = subs[-1]
        sse = stream(emu, last)
        polled_max = 0
        polled_positions: list[int] = []  # the 9th job's, from its status endpoint
        deadline = time.monotonic() + 40
        while True:
            rows = rows_of(emu, subs)  # every status computed at one moment, server side
            running = sum(r["status"] == "IN_PROGRESS" for r in rows)
            assert running <= 3, rows
            polled_max = max(polled_max, running)
            body = state(emu, last)
            if body["status"] == "IN_QUEUE":
                polled_positions.append(body["queue_position"])
            if all(r["status"] == "COMPLETED" for r in rows):
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)
        events = sse.finish()

        rows = rows_of(emu, subs)
        starts = [r["started_at"] for r in rows]
        ends = [r["completed_at"] for r in rows]
        assert all(isinstance(t, float) for t in starts + ends), rows
        assert [r["outcome"] for r in rows] == ["ok"] * 9
        assert starts == sorted(starts)  # FIFO: in submit order
        for i in range(9):
            assert ends[i] - starts[i] == pytest.approx(1.0, abs=1e-6)  # each ran its whole second
            assert starts[i] >= rows[i]["submitted_at"] + 0.05 - 1e-6
        for i in range(3, 9):
            # The 4th takes the slot the 1st frees, the moment it frees it (unless its own
            # queue time is not over yet), and so on.
            assert starts_when_freed(rows[i], ends[i - 3])
        assert peak(rows) == 3  # over the whole timeline, not only the polled moments
        assert emu.max_running("Key test-key") == 3
        assert emu.max_running("Key nobody") == 0
        assert polled_max == 3

    # The 9th job's position: jobs submitted before it that have not started. It falls to 5
    # once the first three run, to 2 once the next three do, then to 0 (the last steps can be
    # too quick to see: the jobs ahead start within a few ms of each other).
    positions = sse.positions()
    assert positions == sorted(set(positions), reverse=True), positions  # one event per change
    assert {5, 2} <= set(positions), positions
    assert positions[-1] <= 2
    assert [e["status"] for e in events][-2:] == ["IN_PROGRESS", "COMPLETED"]
    assert polled_positions == sorted(polled_positions, reverse=True)
    assert {5, 2} <= set(polled_positions), polled_positions


def test_each_token_has_its_own_limit() -> None:
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.2, concurrency=1) as emu:
        emu.add_scenario(Scenario(never_complete=True), match="hold")
        a0 = submit_ok(emu, ALICE, prompt="hold alice")
        b0 = submit_ok(emu, BOB, prompt="hold bob")
        a1 = submit_ok(emu, ALICE, prompt="alice 1")
        b1 = submit_ok(emu, BOB, prompt="bob 1")
        a2 = submit_ok(emu, ALICE, prompt="alice 2")
        wait_running(emu, a0)
        wait_running(emu, b0)
        assert [r["status"] for r in rows_of(emu, [a0, b0])] == ["IN_PROGRESS", "IN_PROGRESS"]
        assert (state(emu, a1)["status"], state(emu, a1)["queue_position"]) == ("IN_QUEUE", 0)
        assert (state(emu, b1)["status"], state(emu, b1)["queue_position"]) == ("IN_QUEUE", 0)
        assert state(emu, a2)["queue_position"] == 1  # a1 is ahead; bob's b1 does not count

        cancel(emu, a0)  # frees alice's slot, not bob's
        wait_started(emu, a1)
        assert state(emu, b1)["status"] == "IN_QUEUE"
        cancel(emu, b0)
        for sub in (a1, b1, a2):
            assert "error" not in wait_completed(emu, sub, timeout=15)

        rows = dict(zip(("a0", "b0", "a1", "b1", "a2"), rows_of(emu, [a0, b0, a1, b1, a2]), strict=True))
        assert starts_when_freed(rows["a1"], rows["a0"]["completed_at"])
        assert starts_when_freed(rows["b1"], rows["b0"]["completed_at"])
        assert starts_when_freed(rows["a2"], rows["a1"]["completed_at"])
        assert emu.max_running("Key alice") == emu.max_running("Key bob") == 1
        assert peak(list(rows.values())) == 2  # one of each at the same time


def test_cancel_of_a_queued_job_lets_the_next_start() -> None:
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.3, concurrency=1) as emu:
        emu.add_scenario(Scenario(never_complete=True), match="hold")
        emu.add_scenario(Scenario(hold_run="running"), match="c")  # runs until its stream has shown it
        a = submit_ok(emu, prompt="hold the slot")
        b = submit_ok(emu, prompt="b")
        c = submit_ok(emu, prompt="c")
        wait_running(emu, a)  # holds its slot: it never completes by itself
        assert state(emu, b)["queue_position"] == 0
        assert state(emu, c)["queue_position"] == 1
        sse = stream(emu, c)

        cancel(emu, b)
        done_b = state(emu, b)
        assert (done_b["status"], done_b["error_type"]) == ("COMPLETED", "request_cancelled")
        assert (state(emu, c)["status"], state(emu, c)["queue_position"]) == ("IN_QUEUE", 0)
        eventually(lambda: len(sse.events) >= 2)  # the stream reported the new position

        cancel(emu, a)  # a running job frees its slot when cancelled
        eventually(lambda: "IN_PROGRESS" in [e["status"] for e in sse.events])
        emu.release("running")
        assert "error" not in wait_completed(emu, c, timeout=15)
        events = sse.finish()
        rows_a, rows_b, rows_c = rows_of(emu, [a, b, c])
        assert rows_b["started_at"] is None  # it never ran
        assert starts_when_freed(rows_c, rows_a["completed_at"])
        assert result(emu, b).status_code == 400
        assert result(emu, c).status_code == 200

    assert sse.positions() == [1, 0]
    assert [e["status"] for e in events] == ["IN_QUEUE", "IN_QUEUE", "IN_PROGRESS", "COMPLETED"]


def test_a_timed_out_queued_job_gives_up_its_place() -> None:
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.2, concurrency=1) as emu:
        emu.add_scenario(Scenario(never_complete=True), match="hold")
        a = submit_ok(emu, prompt="hold the slot")
        b = submit_ok(emu, {**AUTH, "X-Fal-Request-Timeout": "1.2"}, prompt="impatient")
        c = submit_ok(emu, {**AUTH, "X-Fal-Request-Timeout": "60"}, prompt="patient")
        d = submit_ok(emu, prompt="d")
        wait_running(emu, a)
        assert [state(emu, s)["queue_position"] for s in (b, c, d)] == [0, 1, 2]

        done_b = wait_completed(emu, b, timeout=15)  # no slot freed before its deadline
        assert done_b["error_type"] == "request_timeout"
        row_b = rows_of(emu, [b])[0]
        assert row_b["completed_at"] - row_b["submitted_at"] == pytest.approx(1.2, abs=1e-6)
        assert row_b["started_at"] is None
        late = result(emu, b)
        assert (late.status_code, late.headers["X-Fal-Request-Timeout-Type"]) == (504, "user")
        assert [state(emu, s)["queue_position"] for s in (c, d)] == [0, 1]

        cancel(emu, a)
        assert "error" not in wait_completed(emu, c, timeout=15)  # its slot came before its deadline
        assert "error" not in wait_completed(emu, d, timeout=15)
        rows_a, rows_c, rows_d = rows_of(emu, [a, c, d])
        assert starts_when_freed(rows_c, rows_a["completed_at"])
        assert starts_when_freed(rows_d, rows_c["completed_at"])
        assert emu.max_running("Key test-key") == 1


def test_an_edit_frees_its_slot_when_it_ends_even_on_an_input_error() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 0, 255)).save(buf, format="PNG")
    good = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with FluxEmulator(queue_seconds=0.05, run_seconds=3.0, concurrency=1) as emu:
        emu.add_scenario(Scenario(run_seconds=0.3), match="short")

        def edit(prompt: str, image_url: str) -> dict[str, Any]:
            body = {"prompt": prompt, "image_url": image_url}
            resp = requests.post(emu.base_url + EDIT, json=body, headers=AUTH, timeout=10)
            assert resp.status_code == 200, resp.text
            return resp.json()

        bad = edit("fails to load", "data:image/png;base64,!!!not-base64!!!")  # would run 3 s
        fine = edit("short edit", good)
        text = submit_ok(emu, prompt="short text")
        for sub in (bad, fine, text):
            wait_completed(emu, sub, timeout=20)
        rows_bad, rows_fine, rows_text = rows_of(emu, [bad, fine, text])
        assert rows_bad["outcome"] == "input_error"
        assert result(emu, bad).status_code == 422
        # The failed edit ended as soon as its input failed, long before its 3 s run.
        assert rows_bad["completed_at"] < rows_bad["started_at"] + 3.0
        # The next one starts then (or at the end of its own queue time, if that is later).
        assert starts_when_freed(rows_fine, rows_bad["completed_at"])
        # The good edit holds its slot until its run is over and its input is in.
        assert rows_fine["outcome"] == "ok"
        assert rows_fine["completed_at"] - rows_fine["started_at"] >= 0.3 - 1e-6
        assert starts_when_freed(rows_text, rows_fine["completed_at"])
        assert emu.max_running("Key test-key") == 1


def test_without_a_limit_nothing_waits_for_a_slot() -> None:
    with FluxEmulator(queue_seconds=0.05, run_seconds=1.0) as emu:
        assert emu.concurrency is None
        subs = [submit_ok(emu, prompt=f"p{i}") for i in range(4)]
        for sub in subs:
            wait_completed(emu, sub, timeout=15)
        rows = rows_of(emu, subs)
        for row in rows:
            assert row["started_at"] == pytest.approx(row["submitted_at"] + 0.05, abs=1e-6)
            assert row["queue_position"] is None
        assert emu.max_running("Key test-key") == peak(rows)
        assert peak(rows) >= 2  # four one-second runs submitted within a fraction of it


@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_concurrency_must_be_a_positive_int(value: Any) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        FluxEmulator(concurrency=value)


# --------------------------------------------------------------------------- CLI


def test_cli_concurrency() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["--port", "0", "--queue-seconds", "0.05", "--run-seconds", "0.2", "--concurrency", "1"]
    with subprocess.Popen(
        [sys.executable, "-m", "airflow_flux.emulator", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            prefix = "flux emulator listening on http://127.0.0.1:"
            assert line.startswith(prefix) and line[len(prefix) :].isdigit(), line
            base = line[len("flux emulator listening on ") :]
            scenario = {"match": "hold", "scenario": {"never_complete": True}}
            assert requests.post(base + "/_emulator/scenarios", json=scenario, timeout=10).status_code == 200

            def post(prompt: str) -> dict[str, Any]:
                resp = requests.post(base + MODEL, json={"prompt": prompt}, headers=AUTH, timeout=10)
                assert resp.status_code == 200, resp.text
                body: dict[str, Any] = resp.json()
                body["status_url"] = base + body["status_url"].split("queue.fal.run", 1)[1]
                body["cancel_url"] = base + body["cancel_url"].split("queue.fal.run", 1)[1]
                return body

            def get(sub: dict[str, Any]) -> dict[str, Any]:
                body: dict[str, Any] = requests.get(sub["status_url"], headers=AUTH, timeout=10).json()
                return body

            first, second = post("hold"), post("then me")
            eventually(lambda: get(first)["status"] == "IN_PROGRESS")
            assert (get(second)["status"], get(second)["queue_position"]) == ("IN_QUEUE", 0)
            assert jobs_by_id(base)[second["request_id"]]["started_at"] is None
            assert requests.put(first["cancel_url"], headers=AUTH, timeout=10).status_code == 202
            eventually(lambda: get(second)["status"] == "COMPLETED")
            rows = jobs_by_id(base)
            assert starts_when_freed(rows[second["request_id"]], rows[first["request_id"]]["completed_at"])
            proc.terminate()
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_cli_rejects_a_bad_concurrency_and_documents_it() -> None:
    cmd = [sys.executable, "-m", "airflow_flux.emulator"]
    bad = subprocess.run(
        [*cmd, "--port", "0", "--concurrency", "0"], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 1
    assert "concurrency must be at least 1" in bad.stderr
    helped = subprocess.run([*cmd, "--help"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0
    assert "--concurrency N" in helped.stdout
