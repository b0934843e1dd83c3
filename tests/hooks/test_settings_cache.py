"""Connection settings are read once per event loop and connection, for SETTINGS_TTL."""

from __future__ import annotations

import asyncio

import pytest
from airflow.sdk import BaseHook

from airflow_flux.hooks import FluxHook
from airflow_flux.hooks import shared as shared_module


@pytest.fixture
def lookups(monkeypatch):
    """Count the connection reads (the real lookup still runs, from the env var)."""
    seen: list[str] = []
    real = BaseHook.aget_connection

    async def counting(conn_id: str):
        seen.append(conn_id)
        await asyncio.sleep(0.01)  # let concurrent hooks pile up on one lookup
        return await real(conn_id)

    monkeypatch.setattr(BaseHook, "aget_connection", staticmethod(counting))
    return seen


async def test_concurrent_hooks_share_one_lookup(make_flux_conn, lookups):
    conn_id = make_flux_conn("http://127.0.0.1:1")
    other = make_flux_conn("http://127.0.0.1:2")
    settings = await asyncio.gather(*(FluxHook(flux_conn_id=conn_id).aget_settings() for _ in range(50)))
    assert lookups == [conn_id]
    assert all(s is settings[0] for s in settings)
    assert (await FluxHook(flux_conn_id=other).aget_settings()).base_url == "http://127.0.0.1:2"
    assert lookups == [conn_id, other]


async def test_settings_are_read_again_after_the_ttl(make_flux_conn, lookups, monkeypatch):
    # The loop's clock, moved by the test: no real wait decides whether the TTL is over.
    loop = asyncio.get_running_loop()
    real_time, skew = loop.time, [0.0]
    monkeypatch.setattr(loop, "time", lambda: real_time() + skew[0])
    conn_id = make_flux_conn("http://127.0.0.1:1")
    await FluxHook(flux_conn_id=conn_id).aget_settings()
    make_flux_conn("http://127.0.0.1:3", conn_id=conn_id)  # edited connection
    skew[0] = shared_module.SETTINGS_TTL - 1
    assert (await FluxHook(flux_conn_id=conn_id).aget_settings()).base_url == "http://127.0.0.1:1"
    skew[0] = shared_module.SETTINGS_TTL + 1
    assert (await FluxHook(flux_conn_id=conn_id).aget_settings()).base_url == "http://127.0.0.1:3"
    assert lookups == [conn_id, conn_id]


async def test_a_failed_lookup_is_not_kept(make_flux_conn, lookups, monkeypatch):
    from airflow.providers.common.compat.sdk import AirflowNotFoundException

    with pytest.raises(AirflowNotFoundException):
        await FluxHook(flux_conn_id="flux_not_there_yet").aget_settings()
    make_flux_conn("http://127.0.0.1:4", conn_id="flux_not_there_yet")
    assert (await FluxHook(flux_conn_id="flux_not_there_yet").aget_settings()).base_url == "http://127.0.0.1:4"
    assert lookups == ["flux_not_there_yet", "flux_not_there_yet"]


async def test_a_cancelled_waiter_does_not_cancel_the_shared_lookup(make_flux_conn, lookups):
    conn_id = make_flux_conn("http://127.0.0.1:5")
    first = asyncio.create_task(FluxHook(flux_conn_id=conn_id).aget_settings())
    second = asyncio.create_task(FluxHook(flux_conn_id=conn_id).aget_settings())
    await asyncio.sleep(0)
    first.cancel()
    assert (await second).base_url == "http://127.0.0.1:5"
    assert lookups == [conn_id]


async def test_a_long_lived_hook_sends_a_rotated_token_after_the_ttl(emulator, make_flux_conn, lookups, monkeypatch):
    # A trigger's hook lives as long as its wait: it must not keep the token it started with.
    loop = asyncio.get_running_loop()
    real_time, skew = loop.time, [0.0]
    monkeypatch.setattr(loop, "time", lambda: real_time() + skew[0])
    conn_id = make_flux_conn(emulator.base_url, token="token-before-rotation")
    async with FluxHook(flux_conn_id=conn_id) as hook:
        handle = await hook.asubmit({"prompt": "a patient fox"})
        for _ in range(3):
            await hook.aget_status(handle)
        make_flux_conn(emulator.base_url, token="token-after-rotation", conn_id=conn_id)
        skew[0] = shared_module.SETTINGS_TTL - 1
        await hook.aget_status(handle)
        skew[0] = shared_module.SETTINGS_TTL + 1
        await hook.aget_status(handle)
        await hook.aget_status(handle)
    sent = [r.authorization for r in emulator.calls(kind="status")]
    assert sent == ["Bearer token-before-rotation"] * 4 + ["Bearer token-after-rotation"] * 2
    assert lookups == [conn_id, conn_id], "one lookup per TTL, not one per call"
