"""What every hook on one event loop shares: the connection's settings and one aiohttp session.

A triggerer runs thousands of waits in one loop; each would otherwise read its connection
and open its own session and pool. The measured costs are in ``bench/RESULTS.md`` and
``bench/ANALYSIS.md`` (trigger scale).
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Coroutine

    import aiohttp

    from airflow_flux.hooks.settings import FluxConnectionSettings

#: How long the triggerer reuses a connection's settings before reading it again.
SETTINGS_TTL = 60.0


class SettingsCache:
    """Connection settings per event loop and connection id, kept for :data:`SETTINGS_TTL`.

    A triggerer starts thousands of waits on one connection, often in the same second, and
    in a real triggerer each connection read is a round trip to its supervisor. Concurrent
    readers share one lookup; a failed lookup is not kept, and an edited connection is
    picked up by waits started after the TTL.
    """

    _entries: ClassVar[
        weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, dict[str, tuple[float, asyncio.Task[FluxConnectionSettings]]]
        ]
    ] = weakref.WeakKeyDictionary()

    @classmethod
    async def get(
        cls, conn_id: str, load: Callable[[], Coroutine[Any, Any, FluxConnectionSettings]]
    ) -> FluxConnectionSettings:
        loop = asyncio.get_running_loop()
        entries = cls._entries.setdefault(loop, {})
        now = loop.time()
        entry = entries.get(conn_id)
        if entry is None or entry[0] <= now:
            task = loop.create_task(load())
            entry = entries[conn_id] = (now + SETTINGS_TTL, task)

            def forget_failure(done: asyncio.Task[FluxConnectionSettings]) -> None:
                if (done.cancelled() or done.exception() is not None) and entries.get(conn_id, (0, None))[1] is done:
                    del entries[conn_id]

            task.add_done_callback(forget_failure)
        # shield: one waiter being cancelled must not cancel the lookup the others share.
        return await asyncio.shield(entry[1])


async def _closed_at_loop_shutdown(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    """Closes ``session`` when this generator is closed: by :meth:`SharedSessions.release`, or by
    the loop's ``shutdown_asyncgens()``, which ``asyncio.run`` calls before it closes the loop.

    The second is for hooks used without ``async with`` (a script's ``asyncio.run`` over
    ``hook.astream_status(...)``): their session would otherwise outlive its loop and end the
    interpreter with aiohttp's "Unclosed client session" error.
    """
    try:
        yield
    finally:
        await session.close()


class SharedSessions:
    """One aiohttp session per event loop, shared by every hook on it.

    A session and connection pool per wait cost a third more memory per wait than one shared,
    unbounded pool (``bench/RESULTS.md``). The session is reference-counted, so it closes
    with its last user, and at the latest when its loop shuts down: tests and short-lived
    loops leave nothing open.
    """

    # Keyed by the loop itself, weakly: an entry dies with its loop, never reused by another.
    _sessions: ClassVar[
        weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, int, AsyncGenerator[None, None]]
        ]
    ] = weakref.WeakKeyDictionary()

    @classmethod
    async def acquire(cls) -> aiohttp.ClientSession:
        import aiohttp

        key = asyncio.get_running_loop()
        entry = cls._sessions.get(key)
        if entry is None or entry[0].closed:
            # No per-host cap: every wait holds one open status stream to the same host.
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0))
            closer = _closed_at_loop_shutdown(session)
            await closer.__anext__()  # started, so the loop finalises it at shutdown
            entry = (session, 0, closer)
        session, users, closer = entry
        cls._sessions[key] = (session, users + 1, closer)
        return session

    @classmethod
    async def release(cls) -> None:
        key = asyncio.get_running_loop()
        entry = cls._sessions.get(key)
        if entry is None:
            return
        session, users, closer = entry
        if users <= 1:
            del cls._sessions[key]
            await closer.aclose()
        else:
            cls._sessions[key] = (session, users - 1, closer)


#: Result fetches in flight at once per event loop (see :func:`result_slots`).
RESULT_FETCH_CONCURRENCY = 64
_result_slots_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


def result_slots() -> asyncio.Semaphore:
    """The loop's bound on concurrent result fetches, shared by every trigger on it.

    When thousands of waits complete in the same second, each would otherwise open its own
    connection and hold its half-read result at once, in a loop too busy to finish any of
    them sooner: the peak memory of the burst (``bench/RESULTS.md``, trigger scale).
    """
    loop = asyncio.get_running_loop()
    slots = _result_slots_by_loop.get(loop)
    if slots is None:
        slots = _result_slots_by_loop[loop] = asyncio.Semaphore(RESULT_FETCH_CONCURRENCY)
    return slots
