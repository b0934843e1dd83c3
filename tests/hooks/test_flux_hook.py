"""FluxHook against the queue emulator over real sockets."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest
import requests
from PIL import Image

from airflow_flux.emulator import FluxEmulator, Scenario
from airflow_flux.exceptions import (
    FluxAPIError,
    FluxAuthError,
    FluxConfigError,
    FluxResultExpiredError,
    FluxTransportError,
    FluxUntrustedURLError,
    FluxValidationError,
)
from airflow_flux.hooks import FluxConnectionSettings, FluxHook
from airflow_flux.hooks.retry import RetryPolicy, is_retryable_status, parse_retry_after
from airflow_flux.models import FluxRequestHandle, KontextTextToImageRequest
from tests.helpers import FAST_RETRY, TOKEN


def _hook(conn_id: str, policy: RetryPolicy = FAST_RETRY) -> FluxHook:
    return FluxHook(flux_conn_id=conn_id, retry_policy=policy)


def _wait_completed(hook: FluxHook, handle, timeout: float = 10.0) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = hook.get_status(handle)
        if not seen or seen[-1] != status.status:
            seen.append(status.status)
        if status.is_completed:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"not completed in {timeout}s; saw {seen}")


def _status_until(hook: FluxHook, handle, status: str, timeout: float = 30.0) -> list[str]:
    """The statuses seen, polling, until ``status`` (each change once)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1] != status:
        assert time.monotonic() < deadline, f"not {status} in {timeout}s; saw {seen}"
        current = hook.get_status(handle).status
        if not seen or seen[-1] != current:
            seen.append(current)
        if current == "COMPLETED":
            break
        time.sleep(0.02)
    return seen


def test_sync_round_trip_submit_status_result_image(emulator, flux_conn):
    # Held in each state until the test has seen it: no timer decides what a poll finds.
    emulator.add_scenario(Scenario(hold_queue="queued", hold_run="running"), match="a red fox")
    hook = _hook(flux_conn)
    handle = hook.submit({"prompt": "a red fox in snow", "aspect_ratio": "16:9", "seed": 7})

    # Aggregator-style connection: fal's URLs come back re-based onto the emulator.
    assert handle.status_url == f"{emulator.base_url}/fal-ai/flux-pro/requests/{handle.request_id}/status"
    assert handle.response_url == f"{emulator.base_url}/fal-ai/flux-pro/requests/{handle.request_id}"
    assert handle.cancel_url.endswith(f"/requests/{handle.request_id}/cancel")

    assert _status_until(hook, handle, "IN_QUEUE") == ["IN_QUEUE"]
    assert emulator.release("queued") == 1
    assert _status_until(hook, handle, "IN_PROGRESS") == ["IN_QUEUE", "IN_PROGRESS"]
    assert emulator.release("running") == 1
    assert _status_until(hook, handle, "COMPLETED") == ["IN_PROGRESS", "COMPLETED"]
    result = hook.get_result(handle)
    assert result.request_id == handle.request_id
    assert result.seed == 7 and result.prompt == "a red fox in snow"
    assert result.has_nsfw_concepts == [False]
    (image,) = result.images
    assert (image.width, image.height, image.content_type) == (1392, 752, "image/jpeg")

    # The image is public (no token): fetch it and open it as a real JPEG.
    picture = Image.open(io.BytesIO(requests.get(image.url, timeout=10).content))
    assert (picture.format, picture.size) == ("JPEG", (1392, 752))

    # Every API call carried the token; the CDN call was ours, made without it.
    api_calls = [r for r in emulator.requests if r.kind in ("submit", "status", "result")]
    assert api_calls and all(r.authorization == f"Bearer {TOKEN}" for r in api_calls)


def test_model_instance_submit_and_status_by_request_id(emulator, flux_conn):
    hook = _hook(flux_conn)
    handle = hook.submit(KontextTextToImageRequest(prompt="a lighthouse", output_format="png", num_images=2))
    # A bare request id (or a dict with only the id) is enough to follow a request.
    _wait_completed(hook, handle.request_id)
    result = hook.get_result({"request_id": handle.request_id})
    assert [i.content_type for i in result.images] == ["image/png", "image/png"]
    assert emulator.jobs[handle.request_id].input["output_format"] == "png"


def test_key_scheme_and_fal_style_self_urls(make_flux_conn):
    with FluxEmulator(queue_seconds=0.05, run_seconds=0.05, url_mode="self") as emu:
        conn_id = make_flux_conn(emu.base_url, auth_scheme="Key", rebase_urls=False)
        hook = _hook(conn_id)
        handle = hook.submit({"prompt": "a tiger eye"})
        assert handle.status_url.startswith(emu.base_url)
        _wait_completed(hook, handle)
        assert hook.get_result(handle).images
        assert {r.authorization for r in emu.requests if r.kind != "cdn"} == {f"Key {TOKEN}"}


def test_connection_defaults_for_fal_and_for_aggregators(make_flux_conn):
    from airflow.sdk import BaseHook

    fal = FluxConnectionSettings.from_connection(BaseHook.get_connection(make_flux_conn("")))
    assert fal.base_url == "https://queue.fal.run"
    assert (fal.auth_scheme, fal.rebase_urls) == ("Key", False)
    assert fal.is_trusted("https://queue.falrun.com/fal-ai/flux-pro/requests/x/status")
    assert not fal.is_trusted("https://evil.example.com/fal-ai/flux-pro/requests/x/status")
    assert not fal.is_trusted("http://queue.fal.run/x"), "no downgrade to plain http"

    agg = FluxConnectionSettings.from_connection(
        BaseHook.get_connection(make_flux_conn("https://api.example.com/fal/", trusted_hosts="cdn.example.com, x.io"))
    )
    assert (agg.auth_scheme, agg.rebase_urls) == ("Bearer", True)
    assert agg.resolve("https://queue.fal.run/fal-ai/flux-pro/requests/r1/status?logs=1") == (
        "https://api.example.com/fal/fal-ai/flux-pro/requests/r1/status?logs=1"
    )
    assert agg.resolve("https://api.example.com/fal/fal-ai/flux-pro/requests/r1") == (
        "https://api.example.com/fal/fal-ai/flux-pro/requests/r1"
    )
    assert agg.is_trusted("https://cdn.example.com/a") and agg.is_trusted("https://x.io/b")
    assert TOKEN not in repr(agg)


def test_token_is_never_sent_to_a_foreign_host(make_flux_conn):
    """The API returns URLs on another host: refused without rebase, re-based with it."""
    with (
        FluxEmulator(queue_seconds=0.05, run_seconds=0.05) as foreign,
        FluxEmulator(queue_seconds=0.05, run_seconds=0.05, url_mode=foreign.base_url) as api,
    ):
        strict = _hook(make_flux_conn(api.base_url, rebase_urls=False))
        handle = strict.submit({"prompt": "a fox"})
        assert handle.status_url.startswith(foreign.base_url)
        for call in (strict.get_status, strict.get_result, strict.cancel):
            with pytest.raises(FluxUntrustedURLError, match="Refusing to send the API token"):
                call(handle)

        rebasing = _hook(make_flux_conn(api.base_url))
        handle = rebasing.submit({"prompt": "a fox"})
        assert handle.status_url.startswith(api.base_url)
        _wait_completed(rebasing, handle)
        assert rebasing.get_result(handle).images

        assert foreign.requests == [], "the foreign host received a request"


def test_429_with_retry_after_is_waited_out_then_submits_once(emulator, flux_conn):
    emulator.add_scenario(Scenario(submit_errors=[429], retry_after=0.6), match="busy")
    hook = _hook(flux_conn)
    started = time.monotonic()
    handle = hook.submit({"prompt": "busy fox"})
    assert time.monotonic() - started >= 0.6, "Retry-After was not honoured"
    assert [r.status for r in emulator.calls(kind="submit")] == [429, 200]
    assert list(emulator.jobs) == [handle.request_id]


def test_503_and_malformed_status_are_retried(emulator, flux_conn):
    emulator.add_scenario(Scenario(status_errors=[503, 503, "malformed"]), match="flaky")
    hook = _hook(flux_conn)
    handle = hook.submit({"prompt": "flaky fox"})
    status = hook.get_status(handle)
    assert status.status in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    # 503, 503, then a 200 whose body is cut off (retried as malformed), then the real answer.
    calls = [r.status for r in emulator.calls(kind="status")]
    assert calls[:3] == [503, 503, 200] and len(calls) == 4


def test_final_errors_are_not_retried_and_carry_the_api_reason(emulator, flux_conn):
    emulator.add_scenario(Scenario(result_error_always=422, hold_run="running"), match="policy")
    hook = _hook(flux_conn)
    handle = hook.submit({"prompt": "policy fox"})

    # 400: the result is asked for before completion (the request is held running).
    with pytest.raises(FluxAPIError) as early:
        hook.get_result(handle)
    assert early.value.status_code == 400 and not early.value.retryable
    assert "still in progress" in str(early.value)
    assert len(emulator.calls(kind="result")) == 1

    emulator.release("running")
    _wait_completed(hook, handle)
    emulator.clear_requests()
    with pytest.raises(FluxAPIError) as info:
        hook.get_result(handle)
    err = info.value
    assert err.status_code == 422 and err.error_type == "content_policy_violation"
    assert "prompt: The content could not be processed" in str(err)
    assert handle.request_id in str(err)
    assert len(emulator.calls(kind="result")) == 1


def test_5xx_on_result_retried_until_the_policy_gives_up(emulator, flux_conn):
    emulator.add_scenario(Scenario(result_error_always=503), match="down")
    hook = _hook(flux_conn)
    handle = hook.submit({"prompt": "down fox"})
    _wait_completed(hook, handle)
    with pytest.raises(FluxAPIError) as info:
        hook.get_result(handle)
    assert info.value.status_code == 503 and info.value.error_type == "runner_disconnected"
    assert len(emulator.calls(kind="result")) == FAST_RETRY.max_attempts


def test_expired_result_says_so(emulator, flux_conn):
    emulator.add_scenario(Scenario(result_expired=True), match="old")
    hook = _hook(flux_conn)
    handle = hook.submit({"prompt": "old fox"})
    _wait_completed(hook, handle)
    with pytest.raises(FluxResultExpiredError, match="1 hour"):
        hook.get_result(handle)


def test_invalid_input_makes_no_call(emulator, flux_conn):
    hook = _hook(flux_conn)
    with pytest.raises(FluxValidationError, match="num_images: must be a number from 1 to 4"):
        hook.submit({"prompt": "a fox", "num_images": 5})
    assert emulator.requests == []


def test_cancel_outcomes(emulator, flux_conn):
    emulator.add_scenario(Scenario(never_complete=True), match="forever")
    hook = _hook(flux_conn)
    forever = hook.submit({"prompt": "forever fox"})
    assert hook.cancel(forever) == "CANCELLATION_REQUESTED"
    done = hook.submit({"prompt": "quick fox"})
    _wait_completed(hook, done)
    assert hook.cancel(done) == "ALREADY_COMPLETED"
    assert hook.cancel("00000000-0000-0000-0000-00000000dead") == "NOT_FOUND"


def test_test_connection_reports_token_acceptance(make_flux_conn):
    with FluxEmulator(token=TOKEN) as emu:
        ok, message = _hook(make_flux_conn(emu.base_url)).test_connection()
        assert ok, message
        assert "accepted" in message
        ok, message = _hook(make_flux_conn(emu.base_url, token="wrong-token")).test_connection()
        assert not ok
        assert "refused the token" in message and "wrong-token" not in message
        with pytest.raises(FluxAuthError):
            _hook(make_flux_conn(emu.base_url, token="wrong-token")).submit({"prompt": "x"})
    ok, message = _hook(make_flux_conn(emu.base_url)).test_connection()  # server stopped
    assert not ok and "could not reach" in message


def test_retry_rules():
    assert all(is_retryable_status(s, {}) for s in (408, 409, 429, 502, 503, 504))
    assert not any(is_retryable_status(s, {}) for s in (400, 401, 403, 404, 422, 500))
    assert not is_retryable_status(504, {"X-Fal-Request-Timeout-Type": "user"})
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None


def test_token_never_appears_in_logs_or_errors(emulator, flux_conn, caplog):
    caplog.set_level(logging.DEBUG)
    emulator.add_scenario(Scenario(result_error_always=422, status_errors=[503]), match="leak")
    hook = _hook(flux_conn)
    handle = hook.submit({"prompt": "leak fox"})
    _wait_completed(hook, handle)
    messages = []
    with pytest.raises(FluxAPIError) as info:
        hook.get_result(handle)
    messages += [str(info.value), repr(info.value), repr(hook.settings), handle.model_dump_json()]
    assert TOKEN not in caplog.text
    assert not [m for m in messages if TOKEN in m]


# -- async twins --------------------------------------------------------------------------


async def test_async_stream_status_and_result(emulator, flux_conn):
    emulator.add_scenario(Scenario(hold_queue="queued", hold_run="running"), match="a streaming fox")
    hook = _hook(flux_conn)
    handle = hook.submit({"prompt": "a streaming fox"})
    async with _hook(flux_conn) as ahook:
        statuses = []
        # Each state is held until the stream has delivered it.
        async for s in ahook.astream_status(handle):
            statuses.append(s)
            if s.status == "IN_QUEUE":
                emulator.release("queued")
            elif s.status == "IN_PROGRESS":
                emulator.release("running")
        assert statuses[-1].is_completed
        assert [s.status for s in statuses][0] == "IN_QUEUE"
        assert any(s.status == "IN_PROGRESS" for s in statuses)
        result = await ahook.aget_result(handle)
        assert result.images and result.request_id == handle.request_id
        assert (await ahook.aget_status(handle)).is_completed
        assert await ahook.acancel(handle) == "ALREADY_COMPLETED"
    assert len(emulator.calls(kind="stream")) == 1


async def test_async_stream_refused_and_dropped(emulator, flux_conn):
    emulator.add_scenario(Scenario(stream="refuse"), match="nostream")
    emulator.add_scenario(Scenario(stream="drop", stream_drop_after=0.05, run_seconds=5), match="drop")
    hook = _hook(flux_conn)
    refused = hook.submit({"prompt": "nostream fox"})
    dropped = hook.submit({"prompt": "drop fox"})
    async with _hook(flux_conn) as ahook:
        with pytest.raises(FluxAPIError) as info:
            [s async for s in ahook.astream_status(refused)]
        assert info.value.status_code == 404
        with pytest.raises(FluxTransportError, match="Status stream"):
            [s async for s in ahook.astream_status(dropped)]


async def test_async_retries_503_and_malformed(emulator, flux_conn):
    emulator.add_scenario(Scenario(status_errors=[503, "malformed"]), match="flaky")
    handle = _hook(flux_conn).submit({"prompt": "flaky fox"})
    async with _hook(flux_conn) as ahook:
        status = await ahook.aget_status(handle)
    assert status.status in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert [r.status for r in emulator.calls(kind="status")][:2] == [503, 200]
    assert len(emulator.calls(kind="status")) == 3


async def test_async_refuses_foreign_host(make_flux_conn):
    with (
        FluxEmulator() as foreign,
        FluxEmulator(url_mode=foreign.base_url) as api,
    ):
        conn_id = make_flux_conn(api.base_url, rebase_urls=False)
        handle = _hook(conn_id).submit({"prompt": "a fox"})
        async with _hook(conn_id) as ahook:
            with pytest.raises(FluxUntrustedURLError):
                await ahook.aget_status(handle)
            with pytest.raises(FluxUntrustedURLError):
                [s async for s in ahook.astream_status(handle)]
        assert foreign.requests == []


def test_handle_is_json_safe_and_holds_no_secret(emulator, flux_conn):
    handle = _hook(flux_conn).submit({"prompt": "a fox"})
    dumped = handle.model_dump()
    assert set(dumped) == {
        "request_id",
        "status_url",
        "response_url",
        "cancel_url",
        "endpoint",
        "flux_conn_id",
        "inputs",
    }
    # The connection's id, never its token: a sensor fed this handle uses the same account.
    assert dumped["flux_conn_id"] == flux_conn
    assert TOKEN not in json.dumps(dumped)
    assert FluxRequestHandle.model_validate(dumped) == handle


@pytest.mark.parametrize(("status", "resent"), [(429, True), (503, True), (502, False), (504, False)])
def test_submit_is_sent_again_only_when_it_cannot_have_been_queued(emulator, flux_conn, status, resent):
    # 429/503 say the request was not taken; a 502/504 from a gateway may come after fal
    # queued it, and a second submit would pay for a second image.
    emulator.add_scenario(Scenario(submit_errors=[status], retry_after=0.01), match="gateway")
    hook = _hook(flux_conn)
    if resent:
        hook.submit({"prompt": "gateway fox"})
        assert [r.status for r in emulator.calls(kind="submit")] == [status, 200]
    else:
        with pytest.raises(FluxAPIError) as info:
            hook.submit({"prompt": "gateway fox"})
        assert info.value.status_code == status
        assert not info.value.retryable
        assert len(emulator.calls(kind="submit")) == 1


async def test_hooks_on_one_loop_share_one_session_closed_with_its_last_user(emulator, flux_conn):
    handle = _hook(flux_conn).submit({"prompt": "a shared fox"})
    hooks = [_hook(flux_conn) for _ in range(3)]
    statuses = [await h.aget_status(handle) for h in hooks]
    assert all(s.request_id == handle.request_id for s in statuses)
    sessions = {id(h._asession) for h in hooks}
    assert len(sessions) == 1, "each hook opened its own session"
    shared = hooks[0]._asession
    for h in hooks[:-1]:
        await h.aclose()
    assert not shared.closed, "closed while a hook still uses it"
    await hooks[-1].aclose()
    assert shared.closed


def test_an_async_hook_used_without_async_with_leaves_no_session_open(tmp_path):
    """A script's ``asyncio.run`` over the async API, no ``async with``: nothing left unclosed at exit."""
    import subprocess
    import sys

    script = tmp_path / "script.py"
    script.write_text(
        "import asyncio, json, os, tempfile\n"
        "os.environ['AIRFLOW_HOME'] = tempfile.mkdtemp()\n"
        "from airflow_flux.emulator import FluxEmulator\n"
        "from airflow_flux.hooks import FluxHook\n"
        "with FluxEmulator(queue_seconds=0.1, run_seconds=0.2) as emu:\n"
        "    os.environ['AIRFLOW_CONN_FLUX_SCRIPT'] = json.dumps({'conn_type': 'flux', 'host': emu.base_url, 'password': 't'})\n"
        "    hook = FluxHook(flux_conn_id='flux_script')\n"
        "    async def main():\n"
        "        handle = await hook.asubmit({'prompt': 'a scripted fox'})\n"
        "        statuses = [s.status async for s in hook.astream_status(handle)]\n"
        "        print(statuses[-1], (await hook.aget_status(handle)).status)\n"
        "    asyncio.run(main())\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "COMPLETED COMPLETED" in proc.stdout, proc.stdout
    assert "Unclosed" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_signed_urls_the_api_echoes_back_are_redacted_in_errors_and_statuses():
    from airflow_flux.hooks.responses import api_error
    from airflow_flux.models import FluxStatus

    signed = "http://s3.local/bkt/in.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK&X-Amz-Signature=abc123"
    v2 = "https://s3.local/bkt/in.png?AWSAccessKeyId=AK&Signature=def456&Expires=1"
    body = {
        "detail": [{"loc": ["body", "image_url"], "msg": f"Could not download the image at {signed}", "input": signed}]
    }
    err = api_error(422, {}, body, b"", what="Fetching the result", request_id="r")
    assert "abc123" not in str(err) and "abc123" not in json.dumps(err.body)
    assert "image_url" in str(err) and "http://s3.local/bkt/in.png?<signed query redacted>" in str(err)
    raw = f"<html>{v2} refused</html>".encode()
    assert "def456" not in str(api_error(502, {}, None, raw, what="Status check", request_id="r"))
    status = FluxStatus.model_validate(
        {"status": "COMPLETED", "error": f"cannot fetch {signed}", "logs": [{"message": f"fetching {v2}"}]}
    )
    assert "abc123" not in status.error and "def456" not in status.logs[0].message
    # Unsigned URLs are left as they are.
    assert api_error(404, {}, {"detail": "see https://x.example/a?b=1"}, b"", what="x", request_id=None).detail == (
        "see https://x.example/a?b=1"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"media_expires_in": 0}, "media_expires_in must be a positive number of seconds"),
        ({"media_expires_in": "soon"}, "media_expires_in must be a positive number of seconds"),
        ({"price_per_image": -1}, "price_per_image must be a number of US dollars, 0 or more"),
    ],
)
def test_bad_policy_extras_are_refused_naming_the_extra(make_flux_conn, extra, message):
    conn_id = make_flux_conn("https://queue.fal.run", **extra)
    with pytest.raises(FluxConfigError, match=message):
        _hook(conn_id).settings  # noqa: B018
