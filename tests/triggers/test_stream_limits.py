"""What a status stream may do to the triggerer (#22, item 4), with the real emulator.

An event longer than aiohttp's line limit makes the wait poll instead, with a warning (the
single wait and the batch); the loop's connections to the API stay within
``[flux] max_connections`` whatever the number of waits.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp.helpers
import psutil

from airflow_flux.emulator import Scenario
from airflow_flux.hooks import FluxHook
from airflow_flux.hooks.shared import stream_share
from airflow_flux.triggers import FluxStatusTrigger
from airflow_flux.triggers.batch import FluxBatchTrigger, pack_handles
from tests.helpers import FAST_RETRY, releasing

#: Over aiohttp's line limit: twice its read buffer (256 KiB in aiohttp 3.14).
OVERSIZE = 2 * getattr(aiohttp.helpers, "DEFAULT_CHUNK_SIZE", 2**16) + 4096


def _submit_all(conn_id: str, prompts: list[str]) -> list[dict]:
    hook = FluxHook(flux_conn_id=conn_id, retry_policy=FAST_RETRY)
    try:
        return [hook.submit({"prompt": p}).model_dump() for p in prompts]
    finally:
        hook.get_conn().close()  # its keep-alive socket is not the triggers' to count


async def _run(trigger) -> list[dict]:
    return [event.payload async for event in trigger.run()]


async def test_an_oversize_stream_event_makes_the_single_wait_poll_with_a_warning(emulator, flux_conn, capfd):
    emulator.add_scenario(Scenario(stream_event_padding=OVERSIZE), match="a long-winded fox")
    (handle,) = _submit_all(flux_conn, ["a long-winded fox"])
    emulator.clear_requests()
    trigger = FluxStatusTrigger(
        flux_conn_id=flux_conn, handle=handle, end_time=time.time() + 60, poll_interval=0.05, max_poll_interval=0.2
    )
    (event,) = await _run(trigger)
    assert event["status"] == "success", event
    kinds = [r.kind for r in emulator.requests]
    assert kinds[0] == "stream" and kinds.count("stream") == 1, kinds
    assert kinds[-1] == "result" and "status" in kinds, kinds
    text = "".join(capfd.readouterr())
    assert f"The status stream of {handle['request_id']} broke" in text
    assert "longer than aiohttp's line limit" in text
    assert "polling instead" in text


async def test_an_oversize_stream_event_makes_the_batch_poll_that_request_with_a_warning(emulator, flux_conn, capfd):
    emulator.add_scenario(Scenario(stream_event_padding=OVERSIZE, hold_run="running"), match="a verbose fox")
    handles = _submit_all(flux_conn, [f"a verbose fox {i}" for i in range(2)])
    emulator.clear_requests()
    trigger = FluxBatchTrigger(
        flux_conn_id=flux_conn,
        requests=pack_handles(list(enumerate(handles))),
        end_time=time.time() + 60,
        poll_interval=0.05,
        max_poll_interval=0.2,
    )
    # Held running until both streams were opened (and broke): the batch streams a running request.
    with releasing(emulator, ("running", lambda: len(emulator.calls(kind="stream")) >= 2)):
        (event,) = await _run(trigger)
    assert event["status"] == "done", event
    assert [o["status"] for o in event["outcomes"]] == ["completed", "completed"]
    # Each request streamed once, then was polled to the end: a broken stream is not reopened.
    assert sorted(r.request_id for r in emulator.calls(kind="stream")) == sorted(h["request_id"] for h in handles)
    text = "".join(capfd.readouterr())
    for h in handles:
        assert f"The status stream of {h['request_id']} broke" in text
    assert "longer than aiohttp's line limit" in text


def _sockets_to(port: int) -> int:
    """This process's established TCP connections to ``port`` (the client side only)."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def test_connections_per_loop_stay_within_max_connections(emulator, flux_conn, monkeypatch):
    monkeypatch.setenv("AIRFLOW__FLUX__MAX_CONNECTIONS", "4")
    waits = 12
    emulator.add_scenario(Scenario(hold_run="held"), match="a crowded fox")
    handles = _submit_all(flux_conn, [f"a crowded fox {i}" for i in range(waits)])
    emulator.clear_requests()
    triggers = [
        FluxStatusTrigger(
            flux_conn_id=flux_conn, handle=h, end_time=time.time() + 60, poll_interval=0.05, max_poll_interval=0.2
        )
        for h in handles
    ]
    tasks = [asyncio.ensure_future(_run(t)) for t in triggers]
    most_sockets = most_streams = 0

    def sample() -> None:
        nonlocal most_sockets, most_streams
        most_sockets = max(most_sockets, _sockets_to(emulator.port))
        most_streams = max(most_streams, sum(1 for r in emulator.calls(kind="stream") if r.status == 0))

    def all_seen_running() -> bool:
        return all("IN_PROGRESS" in emulator.reported(h["request_id"]) for h in handles)

    # Every wait has seen its request running (by stream or by poll) while it is held there.
    deadline = time.monotonic() + 30
    while not all_seen_running() and time.monotonic() < deadline:
        sample()
        await asyncio.sleep(0.01)
    assert all_seen_running()
    for _ in range(20):  # a few more polling rounds at the bound
        sample()
        await asyncio.sleep(0.02)
    emulator.release("held")
    # Sockets are counted while every wait competes for the pool (above): once the streams
    # end, a socket being closed can still read ESTABLISHED beside the one that replaces it.
    events = [e for (e,) in await asyncio.gather(*tasks)]
    assert [e["status"] for e in events] == ["success"] * waits
    assert 0 < most_sockets <= 4, most_sockets
    assert most_streams == stream_share(4) == 3, most_streams
    assert emulator.calls(kind="status"), "the waits without a stream polled"
