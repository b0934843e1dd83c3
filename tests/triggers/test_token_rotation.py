"""A token rotated while waits run (#22, item 5), with the real emulator.

The old token is refused (403) from the moment the new one is in the connection: a running wait
reads the connection again at its first refusal and carries on, without waiting out the TTL.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from airflow_flux.emulator import Scenario
from airflow_flux.hooks import FluxHook
from airflow_flux.triggers import FluxStatusTrigger
from airflow_flux.triggers.batch import FluxBatchTrigger, pack_handles
from tests.helpers import FAST_RETRY, TOKEN

NEW_TOKEN = "flux-rotated-token-3b8d2e"


async def _until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("use_stream", [True, False], ids=["stream", "poll"])
async def test_a_running_wait_follows_a_rotated_token(emulator, make_flux_conn, use_stream):
    emulator.token = TOKEN
    conn_id = make_flux_conn(emulator.base_url)
    emulator.add_scenario(Scenario(hold_run="rotation"), match="a rotating fox")
    handle = FluxHook(flux_conn_id=conn_id, retry_policy=FAST_RETRY).submit({"prompt": "a rotating fox"}).model_dump()
    trigger = FluxStatusTrigger(
        flux_conn_id=conn_id,
        handle=handle,
        end_time=time.time() + 60,
        use_stream=use_stream,
        poll_interval=0.05,
        max_poll_interval=0.2,
    )
    task = asyncio.ensure_future(_collect(trigger))
    await _until(lambda: "IN_PROGRESS" in emulator.reported(handle["request_id"]))
    # Rotation: the API takes only the new token, the connection holds it, the wait runs on.
    emulator.token = NEW_TOKEN
    make_flux_conn(emulator.base_url, token=NEW_TOKEN, conn_id=conn_id)
    rotated = time.monotonic()
    emulator.release("rotation")
    (event,) = await asyncio.wait_for(task, 30)
    assert event["status"] == "success", event
    # Well within the README's bound (the TTL, 60 s): the first refusal re-read the connection.
    assert time.monotonic() - rotated < 10
    refused = [r for r in emulator.requests if r.status in (401, 403)]
    assert refused and all(r.authorization == f"Bearer {TOKEN}" for r in refused)
    # Refused once with the old token (a poll, or the result after the stream), then sent anew.
    assert len(refused) == 1, refused
    last = emulator.requests[-1]
    assert (last.kind, last.status, last.authorization) == ("result", 200, f"Bearer {NEW_TOKEN}")


async def test_a_batch_follows_a_rotated_token(emulator, make_flux_conn):
    emulator.token = TOKEN
    conn_id = make_flux_conn(emulator.base_url)
    emulator.add_scenario(Scenario(hold_run="rotation"), match="a rotating batch fox")
    hook = FluxHook(flux_conn_id=conn_id, retry_policy=FAST_RETRY)
    handles = [hook.submit({"prompt": f"a rotating batch fox {i}"}).model_dump() for i in range(3)]
    trigger = FluxBatchTrigger(
        flux_conn_id=conn_id,
        requests=pack_handles(list(enumerate(handles))),
        end_time=time.time() + 60,
        poll_interval=0.05,
        max_poll_interval=0.2,
    )
    task = asyncio.ensure_future(_collect(trigger))
    await _until(lambda: all("IN_PROGRESS" in emulator.reported(h["request_id"]) for h in handles))
    emulator.token = NEW_TOKEN
    make_flux_conn(emulator.base_url, token=NEW_TOKEN, conn_id=conn_id)
    emulator.release("rotation")
    (event,) = await asyncio.wait_for(task, 30)
    assert [o["status"] for o in event["outcomes"]] == ["completed"] * 3, event


async def test_a_wrong_token_is_not_sent_twice(emulator, make_flux_conn):
    emulator.token = TOKEN
    conn_id = make_flux_conn(emulator.base_url)
    handle = FluxHook(flux_conn_id=conn_id, retry_policy=FAST_RETRY).submit({"prompt": "a locked-out fox"})
    emulator.token = NEW_TOKEN  # the API moved on, the connection did not
    emulator.clear_requests()
    (event,) = await _collect(FluxStatusTrigger(flux_conn_id=conn_id, handle=handle.model_dump(), use_stream=False))
    assert (event["status"], event["status_code"]) == ("error", 403)
    assert [r.status for r in emulator.requests] == [403], "re-read, same token: not sent again"


async def _collect(trigger) -> list[dict]:
    return [e.payload async for e in trigger.run()]
