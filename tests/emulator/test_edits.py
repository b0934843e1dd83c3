"""The emulator's FLUX.1 Kontext family: edit and multi inputs, [max], request headers.

Real sockets: the emulator fetches its inputs from a tiny HTTP server started here (or
decodes ``data:`` URIs), and the tests read what it fetched from ``emu.jobs[id].input_fetches``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image

from airflow_flux.emulator import FluxEmulator, Scenario
from airflow_flux.emulator import images as emulator_images
from tests.emulator.test_emulator import AUTH, read_sse, rebase, result, status, wait_completed
from tests.helpers import closed_port

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.timeout(60)

EDIT = "fal-ai/flux-pro/kontext"
MULTI = "fal-ai/flux-pro/kontext/multi"
MAX_EDIT = "fal-ai/flux-pro/kontext/max"
MAX_MULTI = "fal-ai/flux-pro/kontext/max/multi"
MAX_T2I = "fal-ai/flux-pro/kontext/max/text-to-image"
T2I = "fal-ai/flux-pro/kontext/text-to-image"
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encoded(colour: tuple[int, int, int], size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


class Origin:
    """A tiny HTTP server for input images; records every request it receives."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[int, str, bytes]] = {}
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                with origin.lock:
                    origin.seen.append({"path": self.path, "headers": dict(self.headers.items())})
                if path == "/slow":
                    time.sleep(5.0)  # longer than any fetch timeout a test sets
                code, content_type, body = origin.files.get(path, (404, "text/plain", b"not found"))
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the emulator gave up (timeout test)
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def serve(self, path: str, body: bytes, content_type: str = "image/png", code: int = 200) -> str:
        self.files[path] = (code, content_type, body)
        return self.url + path


@pytest.fixture
def emu() -> Iterator[FluxEmulator]:
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.1, ping_interval=15.0) as emulator:
        yield emulator


@pytest.fixture
def origin() -> Iterator[Origin]:
    server = Origin()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def submit(emu: FluxEmulator, model: str, headers: dict[str, str] | None = None, **body: Any) -> requests.Response:
    body.setdefault("prompt", "make it pop")
    return requests.post(f"{emu.base_url}/{model}", json=body, headers={**AUTH, **(headers or {})}, timeout=10)


def submit_ok(emu: FluxEmulator, model: str, headers: dict[str, str] | None = None, **body: Any) -> dict[str, Any]:
    resp = submit(emu, model, headers, **body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def output_image(emu: FluxEmulator, sub: dict[str, Any]) -> tuple[dict[str, Any], Image.Image]:
    wait_completed(emu, sub)
    res = result(emu, sub)
    assert res.status_code == 200, res.text
    (meta,) = res.json()["images"]
    data = requests.get(meta["url"], timeout=10).content
    img = Image.open(io.BytesIO(data)).convert("RGB")
    assert img.size == (meta["width"], meta["height"])
    return meta, img


def close_to(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


def load_error(emu: FluxEmulator, sub: dict[str, Any]) -> list[dict[str, Any]]:
    done = wait_completed(emu, sub)
    assert done["status"] == "COMPLETED"
    assert "error" not in done  # like fal: the failure shows only on the result
    res = result(emu, sub)
    assert res.status_code == 422, res.text
    return res.json()["detail"]


# --------------------------------------------------------------------------- edit inputs


def test_edit_fetches_http_input_without_credentials_and_derives_the_output(emu: FluxEmulator, origin: Origin) -> None:
    png = encoded(RED, (400, 300))
    url = origin.serve("/red.png", png) + "?X-Amz-Signature=s3cr3t&X-Amz-Expires=60"
    sub = submit_ok(emu, EDIT, image_url=url)
    assert sub["status_url"].startswith("https://queue.fal.run/fal-ai/flux-pro/requests/")
    job = emu.jobs[sub["request_id"]]
    assert job.input_fetches == []  # nothing is fetched while the job is queued

    meta, img = output_image(emu, sub)
    # No aspect_ratio: the supported ratio nearest to the input's 4:3.
    assert (meta["width"], meta["height"]) == emulator_images.ASPECT_RATIO_SIZES["4:3"]
    assert close_to(img.getpixel((img.width // 2, img.height // 2)), RED)
    assert close_to(img.getpixel((10, 10)), RED)

    (seen,) = origin.seen
    assert seen["path"] == "/red.png?X-Amz-Signature=s3cr3t&X-Amz-Expires=60"  # signature untouched
    assert not any(name.lower() == "authorization" for name in seen["headers"])
    assert "test-key" not in json.dumps(seen["headers"])
    (fetch,) = job.input_fetches
    assert fetch.field == "image_url"
    assert fetch.loc == ["body", "image_url"]
    assert fetch.url == url
    assert fetch.scheme == "http"
    assert fetch.status == 200
    assert fetch.error is None
    assert fetch.ok
    assert fetch.byte_count == len(png)
    assert fetch.sha256 == hashlib.sha256(png).hexdigest()
    assert fetch.authorization_sent is False
    assert not any(name.lower() == "authorization" for name in fetch.headers_sent)
    assert (fetch.width, fetch.height, fetch.image_format) == (400, 300, "PNG")
    assert fetch.started_at >= job.queue_end


def test_edit_aspect_ratio_and_data_uri_input(emu: FluxEmulator) -> None:
    png = encoded(BLUE, (64, 64))
    uri = data_uri(png)
    sub = submit_ok(emu, MAX_EDIT, image_url=uri, aspect_ratio="9:16", output_format="png")
    meta, img = output_image(emu, sub)
    assert (meta["width"], meta["height"]) == (752, 1392)
    assert meta["content_type"] == "image/png"
    assert img.getpixel((img.width // 2, img.height // 2)) == BLUE
    (fetch,) = emu.jobs[sub["request_id"]].input_fetches
    assert (fetch.scheme, fetch.status, fetch.error) == ("data", None, None)
    assert fetch.content_type == "image/png"
    assert fetch.byte_count == len(png)
    assert fetch.sha256 == hashlib.sha256(png).hexdigest()
    assert fetch.headers_sent == {}


def test_edit_aspect_ratio_null_is_accepted(emu: FluxEmulator) -> None:
    sub = submit_ok(emu, EDIT, image_url=data_uri(encoded(RED, (300, 600))), aspect_ratio=None)
    meta, _ = output_image(emu, sub)
    assert (meta["width"], meta["height"]) == emulator_images.ASPECT_RATIO_SIZES["9:16"]  # nearest to 1:2
    # text-to-image keeps refusing a null aspect_ratio, as before
    assert submit(emu, T2I, aspect_ratio=None).status_code == 422


def test_multi_combines_inputs_side_by_side(emu: FluxEmulator, origin: Origin) -> None:
    red = origin.serve("/red.jpg", encoded(RED, (320, 180), "JPEG"), "image/jpeg")
    blue = data_uri(encoded(BLUE, (50, 50)))
    sub = submit_ok(emu, MAX_MULTI, image_urls=[red, blue], num_images=1)
    meta, img = output_image(emu, sub)
    assert (meta["width"], meta["height"]) == emulator_images.ASPECT_RATIO_SIZES["16:9"]  # the first input's
    assert close_to(img.getpixel((img.width // 4, img.height // 2)), RED)
    assert close_to(img.getpixel((3 * img.width // 4, img.height // 2)), BLUE)
    fetches = emu.jobs[sub["request_id"]].input_fetches
    assert [(f.field, f.loc, f.scheme, f.ok) for f in fetches] == [
        ("image_urls[0]", ["body", "image_urls", 0], "http", True),
        ("image_urls[1]", ["body", "image_urls", 1], "data", True),
    ]
    assert [s["path"] for s in origin.seen] == ["/red.jpg"]


def test_edit_stream_and_logs_follow_the_fetch(emu: FluxEmulator, origin: Origin) -> None:
    sub = submit_ok(emu, MULTI, image_urls=[origin.serve("/a.png", encoded(RED, (8, 8)))] * 2)
    url = rebase(emu, sub["status_url"]) + "/stream?logs=1"
    with requests.get(url, headers=AUTH, stream=True, timeout=10) as resp:
        events, _ = read_sse(resp)
    assert events[-1]["status"] == "COMPLETED"
    messages = [entry["message"] for entry in events[-1]["logs"]]
    assert messages[0] == "Starting generation"
    assert "Loaded 2 input images" in messages
    assert messages[-1] == "Generation complete"
    assert len(origin.seen) == 2


def test_render_hook_receives_the_inputs(emu: FluxEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    tiny = encoded((1, 2, 3), (4, 4), "JPEG")

    def fake_render(*args: object, **kwargs: Any) -> bytes:
        calls.append(kwargs)
        return tiny

    monkeypatch.setattr(emulator_images, "render_image", fake_render)
    png = encoded(RED, (16, 16))
    sub = submit_ok(emu, EDIT, image_url=data_uri(png))
    wait_completed(emu, sub)
    assert result(emu, sub).status_code == 200
    assert [c["inputs"] for c in calls] == [[png]]


# --------------------------------------------------------------------------- inputs that fail


def test_unreachable_input_fails_with_422_naming_the_field(emu: FluxEmulator) -> None:
    with closed_port() as port:  # bound, never listening: the fetch is refused
        url = f"http://127.0.0.1:{port}/gone.png?token=abc"
        sub = submit_ok(emu, EDIT, image_url=url)
        (err,) = load_error(emu, sub)
    assert err["loc"] == ["body", "image_url"]
    assert err["type"] == "image_load_error"
    assert err["input"] == url
    assert err["msg"].startswith(f"Could not download the image at {url}: connection failed")
    (fetch,) = emu.jobs[sub["request_id"]].input_fetches
    assert fetch.status is None
    assert fetch.error is not None
    assert fetch.error.startswith("connection failed")
    assert fetch.authorization_sent is False
    # the failed job has no image files and a log line naming the field
    done = status(emu, sub).json()
    assert done["logs"][-1] == {**done["logs"][-1], "message": "Could not load input image image_url", "level": "ERROR"}
    assert requests.get(f"{emu.base_url}/cdn/files/{sub['request_id']}/0.jpg", timeout=5).status_code == 404


def test_http_error_input_in_multi_names_the_index(emu: FluxEmulator, origin: Origin) -> None:
    good = origin.serve("/ok.png", encoded(RED, (8, 8)))
    denied = origin.serve("/denied.png", b"<Error>AccessDenied</Error>", "application/xml", 403) + "?sig=xyz"
    sub = submit_ok(emu, MULTI, image_urls=[good, denied])
    assert load_error(emu, sub) == [
        {
            "loc": ["body", "image_urls", 1],
            "msg": f"Could not download the image at {denied}: HTTP 403",
            "type": "image_load_error",
            "input": denied,
        }
    ]
    fetches = emu.jobs[sub["request_id"]].input_fetches
    assert [(f.status, f.error) for f in fetches] == [(200, None), (403, "HTTP 403")]


def test_non_image_inputs_fail_with_422(emu: FluxEmulator, origin: Origin) -> None:
    text = origin.serve("/notes.txt", b"hello, not an image", "text/plain")
    sub = submit_ok(emu, EDIT, image_url=text)
    (err,) = load_error(emu, sub)
    assert err["loc"] == ["body", "image_url"]
    assert err["type"] == "image_load_error"
    assert err["msg"] == f"Could not load the image at {text}: not an image (cannot identify image file)"
    (fetch,) = emu.jobs[sub["request_id"]].input_fetches
    assert (fetch.status, fetch.byte_count) == (200, len(b"hello, not an image"))

    for bad in ("data:image/png;base64,!!!not-base64!!!", data_uri(b"plain bytes"), "s3://bucket/key.png", "cat.png"):
        sub = submit_ok(emu, MAX_EDIT, image_url=bad)
        (err,) = load_error(emu, sub)
        assert (err["loc"], err["type"], err["input"]) == (["body", "image_url"], "image_load_error", bad)
        assert err["msg"].startswith("Could not load the image at ")


def test_input_fetch_timeout_does_not_block_the_server(origin: Origin) -> None:
    with FluxEmulator(queue_seconds=0.01, run_seconds=0.01, input_fetch_timeout=2) as emu:
        url = origin.serve("/slow", encoded(RED, (8, 8)))
        sub = submit_ok(emu, EDIT, image_url=url)
        deadline = time.monotonic() + 1.5
        while not origin.seen:  # the fetch has begun (its answer is 5 s away)
            assert time.monotonic() < deadline, "the input was never fetched"
            time.sleep(0.01)
        started = time.monotonic()
        running = status(emu, sub)
        assert time.monotonic() - started < 1.0  # the loop is free while the fetch waits its 2 s
        assert running.json()["status"] == "IN_PROGRESS"  # cannot complete before its input
        (err,) = load_error(emu, sub)
        assert err["msg"] == f"Could not download the image at {url}: timed out after 2 s"


# --------------------------------------------------------------------------- submit validation


@pytest.mark.parametrize("model", [EDIT, MAX_EDIT])
def test_edit_submit_validation(emu: FluxEmulator, model: str) -> None:
    missing = submit(emu, model)
    assert missing.status_code == 422
    (err,) = missing.json()["detail"]
    assert (err["loc"], err["type"], err["msg"]) == (["body", "image_url"], "missing", "Field required")

    wrong_type = submit(emu, model, image_url=["https://x.invalid/a.png"]).json()["detail"]
    assert [(e["loc"], e["type"]) for e in wrong_type] == [(["body", "image_url"], "string_type")]

    shared = submit(emu, model, image_url="https://x.invalid/a.png", prompt="", guidance_scale=30, aspect_ratio="5:4")
    assert shared.status_code == 422
    assert {tuple(e["loc"]) for e in shared.json()["detail"]} == {
        ("body", "prompt"),
        ("body", "guidance_scale"),
        ("body", "aspect_ratio"),
    }
    assert emu.jobs == {}


@pytest.mark.parametrize("model", [MULTI, MAX_MULTI])
def test_multi_submit_validation(emu: FluxEmulator, model: str) -> None:
    empty = submit(emu, model, image_urls=[])
    assert empty.status_code == 422
    assert empty.json()["detail"] == [
        {
            "loc": ["body", "image_urls"],
            "msg": "List should have at least 1 item after validation, not 0",
            "type": "too_short",
            "input": [],
            "ctx": {"field_type": "List", "min_length": 1, "actual_length": 0},
        }
    ]
    cases: list[tuple[dict[str, Any], list[Any], str]] = [
        ({}, ["body", "image_urls"], "missing"),
        ({"image_urls": "https://x.invalid/a.png"}, ["body", "image_urls"], "list_type"),
        ({"image_urls": ["https://x.invalid/a.png", 3]}, ["body", "image_urls", 1], "string_type"),
        ({"image_url": "https://x.invalid/a.png"}, ["body", "image_urls"], "missing"),
    ]
    for body, loc, type_ in cases:
        resp = submit(emu, model, **body)
        assert resp.status_code == 422, body
        assert [(e["loc"], e["type"]) for e in resp.json()["detail"]] == [(loc, type_)], body
    assert emu.jobs == {}


def test_every_family_endpoint_accepts_a_valid_submit(emu: FluxEmulator) -> None:
    image = data_uri(encoded(RED, (8, 8)))
    bodies: dict[str, dict[str, Any]] = {
        T2I: {},
        MAX_T2I: {},
        EDIT: {"image_url": image},
        MAX_EDIT: {"image_url": image},
        MULTI: {"image_urls": [image]},
        MAX_MULTI: {"image_urls": [image, image]},
    }
    for model, body in bodies.items():
        sub = submit_ok(emu, model, **body, guidance_scale=3.5, num_images=1, safety_tolerance="6")
        assert sub["status_url"].startswith("https://queue.fal.run/fal-ai/flux-pro/requests/"), model
        assert emu.jobs[sub["request_id"]].model_path == model
        wait_completed(emu, sub)
        assert result(emu, sub).status_code == 200, model
    assert submit(emu, MAX_T2I, prompt="").status_code == 422


# --------------------------------------------------------------------------- request headers


def test_start_timeout_ends_an_edit_before_it_fetches(emu: FluxEmulator, origin: Origin) -> None:
    emu.add_scenario(Scenario(queue_seconds=5))
    url = origin.serve("/red.png", encoded(RED, (8, 8)))
    sub = submit_ok(emu, EDIT, {"X-Fal-Request-Timeout": "1.2"}, image_url=url)
    done = wait_completed(emu, sub)
    assert (done["error"], done["error_type"]) == ("Request timed out before it started", "request_timeout")
    res = result(emu, sub)
    assert res.status_code == 504
    assert res.json() == {"detail": "Request timed out before it started", "error_type": "request_timeout"}
    assert res.headers["X-Fal-Request-Timeout-Type"] == "user"
    job = emu.jobs[sub["request_id"]]
    assert job.request_timeout == 1.2
    assert job.input_fetches == []
    assert origin.seen == []


def test_priority_and_storage_headers_are_recorded(emu: FluxEmulator) -> None:
    lifecycle = json.dumps({"expiration_duration_seconds": 3600})
    low = submit_ok(
        emu,
        T2I,
        {"X-Fal-Queue-Priority": "low", "X-Fal-Store-IO": "0", "X-Fal-Object-Lifecycle-Preference": lifecycle},
    )
    default = submit_ok(emu, T2I)
    job = emu.jobs[low["request_id"]]
    assert (job.priority, job.store_io, job.object_lifecycle_preference) == ("low", "0", lifecycle)
    other = emu.jobs[default["request_id"]]
    assert (other.priority, other.store_io, other.object_lifecycle_preference) == ("normal", None, None)

    for bad in ("high", "LOW", ""):
        resp = submit(emu, EDIT, {"X-Fal-Queue-Priority": bad}, image_url="https://x.invalid/a.png")
        assert resp.status_code == 422
        assert resp.json()["detail"] == [
            {
                "loc": ["header", "x-fal-queue-priority"],
                "msg": "Input should be 'normal' or 'low'",
                "type": "literal_error",
                "input": bad,
                "ctx": {"expected": "'normal' or 'low'"},
            }
        ]
    assert len(emu.jobs) == 2


def test_admin_jobs_show_new_fields_without_url_queries(emu: FluxEmulator, origin: Origin) -> None:
    url = origin.serve("/red.png", encoded(RED, (8, 8))) + "?X-Amz-Signature=s3cr3t"
    uri = data_uri(encoded(BLUE, (8, 8)))
    sub = submit_ok(emu, MULTI, {"X-Fal-Queue-Priority": "low"}, image_urls=[url, uri])
    wait_completed(emu, sub)
    raw = requests.get(emu.base_url + "/_emulator/jobs", timeout=5).text
    assert "s3cr3t" not in raw
    (row,) = json.loads(raw)
    assert row["priority"] == "low"
    assert row["outcome"] == "ok"
    assert row["input"]["image_urls"][0] == origin.url + "/red.png"
    assert row["input"]["image_urls"][1].startswith("data:image/png;base64,…(")
    assert [(f["field"], f["url"], f["status"], f["authorization_sent"]) for f in row["input_fetches"]] == [
        ("image_urls[0]", origin.url + "/red.png", 200, False),
        ("image_urls[1]", row["input"]["image_urls"][1], None, False),
    ]


def test_cancelled_in_the_queue_never_fetches(emu: FluxEmulator, origin: Origin) -> None:
    emu.add_scenario(Scenario(queue_seconds=0.3, hold_queue="queued"))  # in the queue until cancelled
    sub = submit_ok(emu, EDIT, image_url=origin.serve("/red.png", encoded(RED, (8, 8))))
    cancel = requests.put(rebase(emu, sub["cancel_url"]), headers=AUTH, timeout=5)
    assert cancel.status_code == 202
    assert emu.release("queued") == 0  # the cancelled job no longer waits there
    time.sleep(0.5)
    assert wait_completed(emu, sub)["error_type"] == "request_cancelled"
    assert emu.jobs[sub["request_id"]].input_fetches == []
    assert origin.seen == []


def test_a_fetch_interrupted_by_a_restart_runs_again(origin: Origin) -> None:
    emu = FluxEmulator(queue_seconds=0.6, run_seconds=0.05)
    emu.start()
    try:
        sub = submit_ok(emu, EDIT, image_url=origin.serve("/red.png", encoded(RED, (8, 8))))
        emu.stop()
        assert emu.jobs[sub["request_id"]].inputs_pending  # stopped while the job was queued
        emu.start()
        _, img = output_image(emu, sub)
        assert close_to(img.getpixel((img.width // 2, img.height // 2)), RED)
        assert len(origin.seen) == 1
    finally:
        emu.stop()
