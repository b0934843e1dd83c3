"""Tests for the fal queue emulator, over real sockets with plain ``requests``."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from PIL import Image

from airflow_flux.emulator import FluxEmulator, RecordedRequest, Scenario
from airflow_flux.emulator.server import FAL_QUEUE_BASE

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
MODEL = "/fal-ai/flux-pro/kontext/text-to-image"
AUTH = {"Authorization": "Key test-key"}


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def emu() -> Iterator[FluxEmulator]:
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.1, ping_interval=15.0) as emulator:
        yield emulator


def rebase(emu: FluxEmulator, url: str) -> str:
    """Aggregator-style: move fal's queue URLs onto the emulator."""
    assert url.startswith(FAL_QUEUE_BASE)
    return emu.base_url + url[len(FAL_QUEUE_BASE) :]


def submit(emu: FluxEmulator, headers: dict[str, str] | None = None, **body: Any) -> requests.Response:
    body.setdefault("prompt", "a red fox")
    return requests.post(emu.base_url + MODEL, json=body, headers=AUTH if headers is None else headers, timeout=10)


def submit_ok(emu: FluxEmulator, **body: Any) -> dict[str, Any]:
    resp = submit(emu, **body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def status(emu: FluxEmulator, sub: dict[str, Any], logs: bool = True) -> requests.Response:
    url = rebase(emu, sub["status_url"]) + ("?logs=1" if logs else "")
    return requests.get(url, headers=AUTH, timeout=10)


def result(emu: FluxEmulator, sub: dict[str, Any]) -> requests.Response:
    return requests.get(rebase(emu, sub["response_url"]), headers=AUTH, timeout=10)


def wait_completed(emu: FluxEmulator, sub: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = status(emu, sub)
        if resp.status_code == 200:
            return resp.json()
        assert resp.status_code == 202, resp.text
        time.sleep(0.02)
    raise AssertionError("job did not complete")


def read_sse(resp: requests.Response) -> tuple[list[dict[str, Any]], int]:
    """All ``data:`` events (parsed) and the number of ping comments until the stream ends."""
    events: list[dict[str, Any]] = []
    pings = 0
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: ") :]))
        elif line.startswith(":"):
            pings += 1
    return events, pings


# --------------------------------------------------------------------------- happy path


def test_lifecycle_poll_result_and_cdn_jpeg(emu: FluxEmulator) -> None:
    # Each state held until the test has looked at it (gates), so no timer decides what it sees.
    emu.add_scenario(Scenario(queue_seconds=0.2, run_seconds=0.3, hold_queue="queued", hold_run="running"))
    sub = submit_ok(emu, prompt="a red fox in the snow", aspect_ratio="16:9")
    assert sub["status"] == "IN_QUEUE"
    assert sub["logs"] is None
    assert sub["metrics"] == {}
    assert sub["queue_position"] == 0

    first = status(emu, sub)
    assert first.status_code == 202
    assert first.json()["status"] == "IN_QUEUE"
    assert first.json()["logs"] is None

    emu.release("queued")
    running = status(emu, sub)
    deadline = time.monotonic() + 5
    while running.json()["status"] == "IN_QUEUE" and time.monotonic() < deadline:  # its 0.2 s queue time
        time.sleep(0.02)
        running = status(emu, sub)
    assert running.status_code == 202
    body = running.json()
    assert body["status"] == "IN_PROGRESS"
    assert body["logs"][0]["message"] == "Starting generation"
    assert set(body["logs"][0]) == {"message", "level", "source", "timestamp"}
    assert result(emu, sub).status_code == 400
    assert result(emu, sub).json() == {"detail": "Request is still in progress"}

    emu.release("running")
    done = wait_completed(emu, sub)
    assert done["status"] == "COMPLETED"
    # Held past its 0.3 s run: the time it really spent IN_PROGRESS (0.3 exactly: test_png_...).
    inference = done["metrics"]["inference_time"]
    assert set(done["metrics"]) == {"inference_time"} and inference >= 0.3
    assert [entry["message"] for entry in done["logs"]][-1] == "Generation complete"
    assert "error" not in done
    completed_at = emu.complete_time(sub["request_id"])
    assert completed_at is not None
    assert completed_at <= time.time()
    assert emu.jobs[sub["request_id"]].state == "COMPLETED"

    res = result(emu, sub)
    assert res.status_code == 200
    out = res.json()
    assert out["prompt"] == "a red fox in the snow"
    assert out["has_nsfw_concepts"] == [False]
    assert out["timings"] == {"inference": inference}
    assert isinstance(out["seed"], int)
    (image,) = out["images"]
    assert image["url"].startswith(f"{emu.base_url}/cdn/files/{sub['request_id']}/")
    assert (image["width"], image["height"], image["content_type"]) == (1392, 752, "image/jpeg")

    download = requests.get(image["url"], timeout=10)  # no auth on the CDN
    assert download.status_code == 200
    assert download.headers["Content-Type"] == "image/jpeg"
    assert int(download.headers["Content-Length"]) == len(download.content) == image["file_size"]
    pil = Image.open(io.BytesIO(download.content))
    assert (pil.format, pil.size) == ("JPEG", (1392, 752))
    # Stable bytes on a second download.
    assert requests.get(image["url"], timeout=10).content == download.content


def test_png_multiple_images_and_given_seed(emu: FluxEmulator) -> None:
    sub = submit_ok(emu, prompt="tall", aspect_ratio="9:16", output_format="png", num_images=2, seed=1234)
    done = wait_completed(emu, sub)
    # Not held, not interrupted: exactly its run time (the emulator's 0.1 s).
    assert done["metrics"] == {"inference_time": 0.1}
    out = result(emu, sub).json()
    assert out["timings"] == {"inference": 0.1}
    assert out["seed"] == 1234
    assert len(out["images"]) == 2
    assert out["has_nsfw_concepts"] == [False, False]
    blobs = []
    for index, image in enumerate(out["images"]):
        assert image["url"].endswith(f"/{index}.png")
        assert image["content_type"] == "image/png"
        data = requests.get(image["url"], timeout=10).content
        pil = Image.open(io.BytesIO(data))
        assert (pil.format, pil.size) == ("PNG", (752, 1392))
        blobs.append(data)
    assert blobs[0] != blobs[1]


def test_seed_is_deterministic_per_request_id(emu: FluxEmulator) -> None:
    sub = submit_ok(emu)
    wait_completed(emu, sub)
    assert result(emu, sub).json()["seed"] == result(emu, sub).json()["seed"]
    assert emu.jobs[sub["request_id"]].seed == result(emu, sub).json()["seed"]


# --------------------------------------------------------------------------- URLs


def test_fal_mode_urls_use_only_owner_and_app(emu: FluxEmulator) -> None:
    sub = submit_ok(emu)
    prefix = "https://queue.fal.run/fal-ai/flux-pro/requests/"
    rid = sub["request_id"]
    assert sub["response_url"] == prefix + rid
    assert sub["status_url"] == prefix + rid + "/status"
    assert sub["cancel_url"] == prefix + rid + "/cancel"
    assert status(emu, sub).json()["status_url"] == sub["status_url"]


def test_self_mode_urls_point_at_the_emulator() -> None:
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.05, url_mode="self") as emu:
        sub = submit_ok(emu)
        assert sub["status_url"] == f"{emu.base_url}/fal-ai/flux-pro/requests/{sub['request_id']}/status"
        deadline = time.monotonic() + 5
        while requests.get(sub["status_url"], headers=AUTH, timeout=5).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert requests.get(sub["response_url"], headers=AUTH, timeout=5).status_code == 200


def test_foreign_base_url_mode() -> None:
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.05, url_mode="http://foreign.invalid:9") as emu:
        sub = submit_ok(emu)
        assert sub["status_url"].startswith("http://foreign.invalid:9/fal-ai/flux-pro/requests/")


def test_base_url_and_port(emu: FluxEmulator) -> None:
    assert emu.base_url == f"http://127.0.0.1:{emu.port}"
    assert requests.get(emu.base_url + "/_emulator/health", timeout=5).json() == {"ok": True}


# --------------------------------------------------------------------------- auth


def test_auth_schemes_and_errors(emu: FluxEmulator) -> None:
    assert submit(emu, headers={}).status_code == 401
    assert submit(emu, headers={}).json() == {"detail": "Missing or invalid authorization"}
    assert submit(emu, headers={"Authorization": "Basic abc"}).status_code == 401
    assert submit(emu, headers={"Authorization": "Key "}).status_code == 401
    assert submit(emu, headers={"Authorization": "Key any"}).status_code == 200
    assert submit(emu, headers={"Authorization": "Bearer any"}).status_code == 200
    sub = submit_ok(emu)
    assert requests.get(rebase(emu, sub["status_url"]), timeout=5).status_code == 401
    assert requests.get(rebase(emu, sub["response_url"]), timeout=5).status_code == 401
    assert requests.put(rebase(emu, sub["cancel_url"]), timeout=5).status_code == 401
    assert requests.get(rebase(emu, sub["status_url"]) + "/stream", timeout=5).status_code == 401
    assert len(emu.jobs) == 3  # rejected submits create no job


def test_wrong_token_is_403_when_token_configured() -> None:
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.05, token="s3cret") as emu:
        wrong = submit(emu, headers={"Authorization": "Key nope"})
        assert wrong.status_code == 403
        assert wrong.json() == {"detail": "Invalid API key"}
        assert submit(emu, headers={"Authorization": "Key s3cret"}).status_code == 200
        assert submit(emu, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert submit(emu, headers={}).status_code == 401
        assert [r.status for r in emu.calls("submit")] == [403, 200, 200, 401]


# --------------------------------------------------------------------------- SSE


def test_stream_yields_events_until_completed_then_closes(emu: FluxEmulator) -> None:
    # The position falls a step a second (the stream connects well within the first); the run
    # is held until the stream has shown it.
    emu.add_scenario(Scenario(queue_seconds=3, run_seconds=0.3, queue_position=2, hold_run="running"))
    sub = submit_ok(emu)
    assert sub["queue_position"] == 2
    url = rebase(emu, sub["status_url"]) + "/stream?logs=1"
    events: list[dict[str, Any]] = []
    with requests.get(url, headers=AUTH, stream=True, timeout=10) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
                if events[-1]["status"] == "IN_PROGRESS":
                    emu.release("running")
    states = [e["status"] for e in events]
    assert states[0] == "IN_QUEUE"
    assert states[-1] == "COMPLETED"
    assert "IN_PROGRESS" in states
    positions = [e["queue_position"] for e in events if e["status"] == "IN_QUEUE"]
    assert positions == [2, 1, 0]
    assert len(events[-1]["logs"]) == 4
    # The client has the last event before the server's handler returns and records the
    # status (0 while a stream is open), so wait for the server side to finish.
    deadline = time.monotonic() + 5
    while emu.calls("stream")[0].status == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    (stream_call,) = emu.calls("stream")
    assert stream_call.status == 200
    assert stream_call.request_id == sub["request_id"]


def test_stream_event_padding_pads_stream_events_only(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(stream_event_padding=300_000))
    sub = submit_ok(emu)
    url = rebase(emu, sub["status_url"]) + "/stream?logs=0"
    with requests.get(url, headers=AUTH, stream=True, timeout=10) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith(b"data: ")]
    assert lines and all(len(line) > 300_000 for line in lines)
    assert json.loads(lines[-1][len(b"data: ") :])["status"] == "COMPLETED"
    assert "padding" not in status(emu, sub).json(), "polls are not padded"
    with pytest.raises(ValueError, match="stream_event_padding"):
        Scenario(stream_event_padding=-1)


def test_stream_pings_and_cancel_wakes_it() -> None:
    with FluxEmulator(queue_seconds=0.02, run_seconds=0.05, ping_interval=0.1) as emu:
        emu.add_scenario(Scenario(never_complete=True))
        sub = submit_ok(emu)
        url = rebase(emu, sub["status_url"]) + "/stream"
        events: list[dict[str, Any]] = []
        pings = 0
        with requests.get(url, headers=AUTH, stream=True, timeout=10) as resp:
            lines = resp.iter_lines(decode_unicode=True)
            for line in lines:
                if line == ": ping":
                    pings += 1
                    if pings == 3:
                        break
                elif line.startswith("data: "):
                    events.append(json.loads(line[6:]))
            assert emu.calls("stream")[0].status == 0  # still open
            cancel = requests.put(rebase(emu, sub["cancel_url"]), headers=AUTH, timeout=5)
            assert cancel.status_code == 202
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1]["status"] == "COMPLETED"
        assert events[-1]["error_type"] == "request_cancelled"
        assert {"IN_PROGRESS"} <= {e["status"] for e in events}


def test_many_concurrent_streams() -> None:
    import aiohttp

    with FluxEmulator(queue_seconds=0.3, run_seconds=0.3) as emu:
        subs = [submit_ok(emu, prompt=f"p{i}") for i in range(20)]

        async def consume(session: aiohttp.ClientSession, sub: dict[str, Any]) -> str:
            async with session.get(rebase(emu, sub["status_url"]) + "/stream", headers=AUTH) as resp:
                last = ""
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line.startswith("data: "):
                        last = json.loads(line[6:])["status"]
                return last

        async def run() -> list[str]:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                # 25 streams per job: 500 concurrent SSE connections on one server loop.
                return await asyncio.gather(*(consume(session, s) for s in subs for _ in range(25)))

        started = time.monotonic()
        finals = asyncio.run(run())
        assert finals == ["COMPLETED"] * 500
        assert time.monotonic() - started < 10


def test_stop_does_not_hang_with_open_streams() -> None:
    emu = FluxEmulator(queue_seconds=0.01, run_seconds=0.01, ping_interval=30)
    emu.start()
    emu.add_scenario(Scenario(never_complete=True))
    sub = submit_ok(emu)
    url = rebase(emu, sub["status_url"]) + "/stream"
    got_first = threading.Event()

    def reader() -> None:
        try:
            with requests.get(url, headers=AUTH, stream=True, timeout=10) as resp:
                for line in resp.iter_lines():
                    if line:
                        got_first.set()
        except requests.RequestException:
            pass

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert got_first.wait(5)
    started = time.monotonic()
    emu.stop()
    assert time.monotonic() - started < 5
    thread.join(5)
    assert not thread.is_alive()


# --------------------------------------------------------------------------- cancel


def test_cancel_semantics(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(queue_seconds=5))
    sub = submit_ok(emu)
    cancel_url = rebase(emu, sub["cancel_url"])
    first = requests.put(cancel_url, headers=AUTH, timeout=5)
    assert (first.status_code, first.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    job = emu.jobs[sub["request_id"]]
    assert job.cancelled
    assert job.completed_at is not None
    done = status(emu, sub)
    assert done.status_code == 200
    assert done.json()["error"] == "Request was cancelled"
    assert done.json()["error_type"] == "request_cancelled"
    res = result(emu, sub)
    assert res.status_code == 400
    assert res.json()["detail"] == "Request was cancelled"
    again = requests.put(cancel_url, headers=AUTH, timeout=5)
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})
    unknown = requests.put(emu.base_url + "/fal-ai/flux-pro/requests/nope/cancel", headers=AUTH, timeout=5)
    assert (unknown.status_code, unknown.json()) == (404, {"status": "NOT_FOUND"})


def test_cancel_after_completion_and_override(emu: FluxEmulator) -> None:
    sub = submit_ok(emu)
    wait_completed(emu, sub)
    late = requests.put(rebase(emu, sub["cancel_url"]), headers=AUTH, timeout=5)
    assert (late.status_code, late.json()) == (400, {"status": "ALREADY_COMPLETED"})

    emu.add_scenario(Scenario(cancel_response="CANCELLATION_REQUESTED"), match="stubborn")
    sub = submit_ok(emu, prompt="stubborn job")
    ack = requests.put(rebase(emu, sub["cancel_url"]), headers=AUTH, timeout=5)
    assert ack.status_code == 202
    assert "error" not in wait_completed(emu, sub)  # acknowledged, but it still finished
    assert result(emu, sub).status_code == 200


# --------------------------------------------------------------------------- faults


def test_submit_errors_then_success(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(submit_errors=[429, 503], retry_after=0.5), match="busy")
    first = submit(emu, prompt="busy day")
    assert first.status_code == 429
    assert first.headers["Retry-After"] == "0.5"
    assert first.json() == {"detail": "Too many requests"}
    second = submit(emu, prompt="busy day")
    assert second.status_code == 503
    assert second.json() == {"detail": "Service unavailable", "error_type": "runner_disconnected"}
    assert second.headers["X-Fal-Error-Type"] == "runner_disconnected"
    assert second.headers["Retry-After"] == "0.5"
    assert emu.jobs == {}
    assert submit(emu, prompt="busy day").status_code == 200
    assert submit(emu, prompt="other").status_code == 200  # not matched, default scenario
    assert len(emu.jobs) == 2


def test_status_errors_including_malformed(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(status_errors=[500, "malformed", 429]))
    sub = submit_ok(emu)
    first = status(emu, sub)
    assert first.status_code == 500
    assert first.json() == {"detail": "Internal server error", "error_type": "internal_error"}
    assert first.headers["X-Fal-Error-Type"] == "internal_error"
    second = status(emu, sub)
    assert second.status_code == 200
    assert second.headers["Content-Type"].startswith("application/json")
    assert second.text == '{"status": "IN_PRO'
    with pytest.raises(requests.exceptions.JSONDecodeError):
        second.json()
    # Streams count as status calls too.
    stream = requests.get(rebase(emu, sub["status_url"]) + "/stream", headers=AUTH, timeout=5)
    assert stream.status_code == 429
    assert stream.headers["Retry-After"] == "1"
    assert wait_completed(emu, sub)["status"] == "COMPLETED"


def test_stream_malformed_event(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(status_errors=["malformed"]))
    sub = submit_ok(emu)
    with requests.get(rebase(emu, sub["status_url"]) + "/stream", headers=AUTH, stream=True, timeout=5) as resp:
        lines = [line for line in resp.iter_lines(decode_unicode=True) if line]
    assert lines == ['data: {"status": "IN_PRO']


def test_stream_refused_but_polling_works(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(stream="refuse"))
    sub = submit_ok(emu)
    resp = requests.get(rebase(emu, sub["status_url"]) + "/stream", headers=AUTH, timeout=5)
    assert (resp.status_code, resp.json()) == (404, {"detail": "Not found"})
    assert wait_completed(emu, sub)["status"] == "COMPLETED"


def test_stream_drop_breaks_connection(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(stream="drop", stream_drop_after=0.05, queue_seconds=1))
    sub = submit_ok(emu)
    events: list[dict[str, Any]] = []

    def consume() -> None:
        url = rebase(emu, sub["status_url"]) + "/stream"
        with requests.get(url, headers=AUTH, stream=True, timeout=5) as resp:
            events.extend(json.loads(line[6:]) for line in resp.iter_lines() if line.startswith(b"data: "))

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        consume()
    assert [e["status"] for e in events] == ["IN_QUEUE"]


def test_complete_error(emu: FluxEmulator) -> None:
    err = {"error": "Internal error during inference", "error_type": "internal_error"}
    emu.add_scenario(Scenario(complete_error=err))
    sub = submit_ok(emu)
    done = wait_completed(emu, sub)
    assert done["error"] == err["error"]
    assert done["error_type"] == "internal_error"
    res = result(emu, sub)
    assert res.status_code == 500
    assert res.json() == {"detail": "Internal error during inference", "error_type": "internal_error"}
    assert res.headers["X-Fal-Error-Type"] == "internal_error"


def test_result_422_content_policy_body(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(result_error_always=422), match="forbidden")
    sub = submit_ok(emu, prompt="something forbidden")
    wait_completed(emu, sub)
    for _ in range(2):
        res = result(emu, sub)
        assert res.status_code == 422
        assert res.json() == {
            "detail": [
                {
                    "loc": ["body", "prompt"],
                    "msg": "The content could not be processed because it contained material flagged by a "
                    "content checker.",
                    "type": "content_policy_violation",
                    "ctx": {},
                    "input": "something forbidden",
                }
            ]
        }


def test_result_errors_then_success(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(result_errors=[504, 503, 502]))
    sub = submit_ok(emu)
    assert result(emu, sub).status_code == 400  # not done yet: does not consume a fault
    wait_completed(emu, sub)
    expected = [(504, "request_timeout"), (503, "runner_disconnected"), (502, "bad_gateway")]
    for code, error_type in expected:
        res = result(emu, sub)
        assert res.status_code == code
        assert res.json()["error_type"] == error_type
        assert res.headers["X-Fal-Error-Type"] == error_type
    assert result(emu, sub).status_code == 200


def test_result_expired(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(result_expired=True))
    sub = submit_ok(emu)
    wait_completed(emu, sub)
    res = result(emu, sub)
    assert (res.status_code, res.json()) == (404, {"detail": "Request not found"})


def test_never_complete(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(never_complete=True, queue_seconds=0.02, run_seconds=0.05))
    sub = submit_ok(emu)
    time.sleep(0.2)
    resp = status(emu, sub)
    assert resp.status_code == 202
    assert resp.json()["status"] == "IN_PROGRESS"
    assert [e["message"] for e in resp.json()["logs"]] == ["Starting generation", "Step 10/28", "Step 20/28"]
    assert emu.complete_time(sub["request_id"]) is None


def test_nsfw_flags_and_black_image(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(nsfw=[False, True]))
    sub = submit_ok(emu, num_images=2)
    wait_completed(emu, sub)
    out = result(emu, sub).json()
    assert out["has_nsfw_concepts"] == [False, True]
    flagged = Image.open(io.BytesIO(requests.get(out["images"][1]["url"], timeout=5).content))
    assert flagged.convert("L").getextrema()[1] < 10  # black frame, as FLUX returns


def test_sync_mode_returns_data_uris(emu: FluxEmulator) -> None:
    sub = submit_ok(emu, sync_mode=True, aspect_ratio="4:3")
    wait_completed(emu, sub)
    (image,) = result(emu, sub).json()["images"]
    prefix = "data:image/jpeg;base64,"
    assert image["url"].startswith(prefix)
    data = base64.b64decode(image["url"][len(prefix) :])
    assert len(data) == image["file_size"]
    assert Image.open(io.BytesIO(data)).size == (1184, 880)


def test_image_bytes_pads_to_a_large_valid_image(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(image_bytes=3_000_000))
    sub = submit_ok(emu, aspect_ratio="1:1")
    wait_completed(emu, sub)
    (image,) = result(emu, sub).json()["images"]
    assert image["file_size"] >= 3_000_000
    data = requests.get(image["url"], timeout=10).content
    assert len(data) == image["file_size"]
    pil = Image.open(io.BytesIO(data))
    pil.load()
    assert (pil.format, pil.size) == ("JPEG", (1024, 1024))
    assert requests.get(image["url"], timeout=10).content == data


def test_cdn_break_after(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(cdn_break_after=1000))
    sub = submit_ok(emu)
    wait_completed(emu, sub)
    (image,) = result(emu, sub).json()["images"]
    with requests.get(image["url"], stream=True, timeout=5) as resp:
        assert int(resp.headers["Content-Length"]) == image["file_size"]
        received = bytearray()

        def consume() -> None:
            for chunk in resp.iter_content(100):
                received.extend(chunk)

        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            consume()
    assert len(received) == 1000


def test_cdn_throttle(emu: FluxEmulator) -> None:
    emu.add_scenario(Scenario(cdn_bytes_per_second=400_000, image_bytes=120_000))
    sub = submit_ok(emu)
    wait_completed(emu, sub)
    (image,) = result(emu, sub).json()["images"]
    started = time.monotonic()
    data = requests.get(image["url"], timeout=10).content
    elapsed = time.monotonic() - started
    assert len(data) == image["file_size"]
    assert elapsed >= 0.8 * image["file_size"] / 400_000


def test_cdn_unknown_file(emu: FluxEmulator) -> None:
    assert requests.get(emu.base_url + "/cdn/files/nope/0.jpg", timeout=5).status_code == 404
    sub = submit_ok(emu)
    wait_completed(emu, sub)
    assert requests.get(f"{emu.base_url}/cdn/files/{sub['request_id']}/1.jpg", timeout=5).status_code == 404
    assert requests.get(f"{emu.base_url}/cdn/files/{sub['request_id']}/0.png", timeout=5).status_code == 404
    head = requests.head(f"{emu.base_url}/cdn/files/{sub['request_id']}/0.jpg", timeout=5)
    assert head.status_code == 200
    assert int(head.headers["Content-Length"]) > 0


def test_request_timeout_header(emu: FluxEmulator) -> None:
    # fal's clients require more than 1 s, so the shortest deadline is just above that.
    emu.add_scenario(Scenario(queue_seconds=5))
    resp = requests.post(
        emu.base_url + MODEL,
        json={"prompt": "late"},
        headers={**AUTH, "X-Fal-Request-Timeout": "1.1"},
        timeout=5,
    )
    sub = resp.json()
    assert emu.jobs[sub["request_id"]].request_timeout == 1.1
    done = wait_completed(emu, sub)
    assert done["error_type"] == "request_timeout"
    assert [entry["message"] for entry in done["logs"]] == ["Request timed out in queue"]
    completed_at = emu.complete_time(sub["request_id"])
    assert completed_at is not None
    assert completed_at - emu.jobs[sub["request_id"]].submitted_at == pytest.approx(1.1, abs=0.01)
    res = result(emu, sub)
    assert res.status_code == 504
    assert res.json() == {"detail": "Request timed out before it started", "error_type": "request_timeout"}
    assert res.headers["X-Fal-Request-Timeout-Type"] == "user"
    assert res.headers["X-Fal-Error-Type"] == "request_timeout"


def test_request_timeout_longer_than_the_queue_is_not_hit(emu: FluxEmulator) -> None:
    resp = requests.post(
        emu.base_url + MODEL, json={"prompt": "in time"}, headers={**AUTH, "X-Fal-Request-Timeout": "30"}, timeout=5
    )
    sub = resp.json()
    done = wait_completed(emu, sub)
    assert "error" not in done
    assert result(emu, sub).status_code == 200


@pytest.mark.parametrize("value", ["1", "0.5", "0", "-3", "soon", "", "nan", "inf"])
def test_request_timeout_must_be_more_than_one_second(emu: FluxEmulator, value: str) -> None:
    resp = requests.post(
        emu.base_url + MODEL, json={"prompt": "x"}, headers={**AUTH, "X-Fal-Request-Timeout": value}, timeout=5
    )
    assert resp.status_code == 422
    (err,) = resp.json()["detail"]
    assert err["loc"] == ["header", "x-fal-request-timeout"]
    assert err["msg"] == "X-Fal-Request-Timeout must be a number of seconds greater than 1"
    assert err["input"] == value
    assert emu.jobs == {}


def test_request_id_is_scoped_to_its_app(emu: FluxEmulator) -> None:
    sub = submit_ok(emu)
    wait_completed(emu, sub)
    wrong_app = f"{emu.base_url}/fal-ai/other/requests/{sub['request_id']}"
    assert requests.get(wrong_app, headers=AUTH, timeout=5).status_code == 404
    full_path = f"{emu.base_url}{MODEL}/requests/{sub['request_id']}/status"
    assert requests.get(full_path, headers=AUTH, timeout=5).status_code in (404, 405)


def test_restart() -> None:
    emu = FluxEmulator(queue_seconds=0.01, run_seconds=0.01)
    emu.start()
    emu.stop()
    emu.start()
    try:
        sub = submit_ok(emu)
        wait_completed(emu, sub)
        (image,) = result(emu, sub).json()["images"]
        assert requests.get(image["url"], timeout=5).status_code == 200
    finally:
        emu.stop()


def test_unknown_request_ids(emu: FluxEmulator) -> None:
    base = emu.base_url + "/fal-ai/flux-pro/requests/nope"
    for url in (base, base + "/status", base + "/status/stream"):
        resp = requests.get(url, headers=AUTH, timeout=5)
        assert (resp.status_code, resp.json()) == (404, {"detail": "Request not found"})


# --------------------------------------------------------------------------- validation


def test_submit_validation_422(emu: FluxEmulator) -> None:
    bad = {
        "prompt": "",
        "guidance_scale": 25,
        "num_images": 5,
        "output_format": "webp",
        "safety_tolerance": "7",
        "aspect_ratio": "5:4",
        "seed": "x",
        "enhance_prompt": "yes",
        "sync_mode": 1,
    }
    resp = requests.post(emu.base_url + MODEL, json=bad, headers=AUTH, timeout=5)
    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert {tuple(e["loc"]) for e in detail} == {("body", name) for name in bad}
    assert all({"loc", "msg", "type"} <= set(e) for e in detail)

    missing = requests.post(emu.base_url + MODEL, json={"num_images": 1}, headers=AUTH, timeout=5)
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert missing.json()["detail"][0]["type"] == "missing"

    for ok in ({"guidance_scale": 1}, {"guidance_scale": 20.0}, {"safety_tolerance": "6"}, {"seed": None}):
        assert submit(emu, **ok).status_code == 200, ok
    not_json = requests.post(emu.base_url + MODEL, data=b"{", headers=AUTH, timeout=5)
    assert not_json.status_code == 422
    assert emu.calls("submit")[-1].status == 422


def test_other_models_accept_any_object(emu: FluxEmulator) -> None:
    resp = requests.post(emu.base_url + "/fal-ai/other-model", json={"anything": 1}, headers=AUTH, timeout=5)
    assert resp.status_code == 200
    assert resp.json()["status_url"].startswith("https://queue.fal.run/fal-ai/other-model/requests/")
    fal_webhook = requests.post(
        emu.base_url + MODEL + "?fal_webhook=https://example.invalid/hook",
        json={"prompt": "x"},
        headers=AUTH,
        timeout=5,
    )
    assert fal_webhook.status_code == 200


# --------------------------------------------------------------------------- recording and admin


def test_request_log_records_kinds_and_auth(emu: FluxEmulator) -> None:
    sub = submit_ok(emu)
    wait_completed(emu, sub)
    out = result(emu, sub).json()
    requests.get(out["images"][0]["url"], timeout=5)
    requests.put(rebase(emu, sub["cancel_url"]), headers={"Authorization": "Bearer b"}, timeout=5)
    requests.get(emu.base_url + "/_emulator/health", timeout=5)
    requests.get(emu.base_url + "/nowhere", timeout=5)

    log = emu.requests
    assert all(isinstance(r, RecordedRequest) for r in log)
    kinds = [r.kind for r in log]
    assert kinds[0] == "submit"
    assert kinds[-4:] == ["cdn", "cancel", "admin", "other"]
    assert set(kinds[1:-5]) == {"status"}
    assert kinds[-5] == "result"
    first = log[0]
    assert first.method == "POST"
    assert first.path == MODEL
    assert first.status == 200
    assert first.authorization == "Key test-key"
    assert first.request_id == sub["request_id"]
    assert first.body == {"prompt": "a red fox"}
    assert emu.calls("cancel")[0].authorization == "Bearer b"
    assert emu.calls("cdn")[0].authorization is None
    assert emu.calls("status")[0].query == "logs=1"
    assert emu.calls("other")[0].status == 404
    times = [r.time for r in log]
    assert times == sorted(times)
    emu.clear_requests()
    assert emu.requests == []


def test_admin_http_endpoints(emu: FluxEmulator) -> None:
    base = emu.base_url + "/_emulator"
    assert requests.get(base + "/health", timeout=5).json() == {"ok": True}
    posted = requests.post(base + "/scenarios", json={"match": "slow", "scenario": {"submit_errors": [429]}}, timeout=5)
    assert posted.status_code == 200
    assert submit(emu, prompt="slow one").status_code == 429
    bad = requests.post(base + "/scenarios", json={"match": None, "scenario": {"nope": 1}}, timeout=5)
    assert bad.status_code == 400
    recorded = requests.get(base + "/requests", timeout=5).json()
    assert [r["kind"] for r in recorded][:3] == ["admin", "admin", "submit"]
    assert recorded[2]["status"] == 429
    assert requests.post(base + "/reset", timeout=5).json() == {"ok": True}
    assert submit(emu, prompt="slow one").status_code == 200  # scenarios forgotten
    assert len(emu.jobs) == 1


# --------------------------------------------------------------------------- packaging / CLI


def test_import_is_light() -> None:
    code = (
        "import sys, airflow_flux.emulator as e; "
        "assert 'PIL' not in sys.modules and 'aiohttp' not in sys.modules, sorted(sys.modules); "
        "e.Scenario; assert 'PIL' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=30)


def test_cli_serves_and_terminates() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "airflow_flux.emulator", "--port", "0", "--queue-seconds", "0.05"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            # --port 0: the OS picks the port, the first line says which.
            match = re.fullmatch(r"flux emulator listening on http://127\.0\.0\.1:(\d+)", line)
            assert match is not None and int(match.group(1)) > 0, line
            health = requests.get(f"http://127.0.0.1:{match.group(1)}/_emulator/health", timeout=5)
            assert health.json() == {"ok": True}
            proc.terminate()
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
