"""What every hook on one event loop shares: the connection's settings, one aiohttp session
and its bounded pool of connections.

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

#: Default of ``[flux] max_connections`` (see :func:`max_connections`).
DEFAULT_MAX_CONNECTIONS = 100


def max_connections() -> int:
    """``[flux] max_connections``: HTTP connections to the API one event loop (a triggerer) holds at once.

    An Airflow option, not a connection extra: the pool belongs to the triggerer's loop and
    is shared by every ``flux`` connection and trigger on it, so a per-connection value would
    depend on which wait came first. Read when the loop's session is made.
    """
    from airflow.providers.common.compat.sdk import conf

    from airflow_flux.exceptions import FluxConfigError

    value = conf.getint("flux", "max_connections", fallback=DEFAULT_MAX_CONNECTIONS)
    if value < 1:
        raise FluxConfigError(f"[flux] max_connections must be 1 or more, got {value}")
    return value


def stream_share(connections: int) -> int:
    """Status streams allowed among ``connections``: three quarters, so polls, result fetches
    and cancels always have a quarter (at least one) and never queue behind streams that
    stay open for minutes."""
    return connections - max(1, connections // 4)


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

    @classmethod
    async def reload(
        cls,
        conn_id: str,
        stale: FluxConnectionSettings,
        load: Callable[[], Coroutine[Any, Any, FluxConnectionSettings]],
    ) -> FluxConnectionSettings:
        """The connection read again before the TTL, after the API refused ``stale``'s token.

        Only while ``stale`` is still the one kept: waits refused together share one lookup,
        and a wait refused after another already re-read it gets that reading.
        """
        entries = cls._entries.setdefault(asyncio.get_running_loop(), {})
        task = entries.get(conn_id, (0.0, None))[1]
        if task is not None and task.done() and not task.cancelled() and task.exception() is None:  # noqa: SIM102
            # Not yet read again by another wait: drop it, so the next get() reads it.
            if task.result() is stale:
                del entries[conn_id]
        return await cls.get(conn_id, load)


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

    A session and connection pool per wait cost a third more memory per wait than one shared
    pool (``bench/RESULTS.md``). The pool holds at most :func:`max_connections` connections:
    a triggerer is shared with other providers, and one socket per wait has no bound. The
    session is reference-counted, so it closes with its last user, and at the latest when its
    loop shuts down: tests and short-lived loops leave nothing open.
    """

    # Keyed by the loop itself, weakly: an entry dies with its loop, never reused by another.
    _sessions: ClassVar[
        weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, int, AsyncGenerator[None, None]]
        ]
    ] = weakref.WeakKeyDictionary()
    #: Per loop: status streams open, and how many may be.
    _streams: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[int]]] = weakref.WeakKeyDictionary()

    @classmethod
    async def acquire(cls) -> aiohttp.ClientSession:
        import aiohttp

        key = asyncio.get_running_loop()
        entry = cls._sessions.get(key)
        if entry is None or entry[0].closed:
            limit = max_connections()
            # All waits call one host: the loop's bound is the host's bound.
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit, limit_per_host=0))
            cls._streams.setdefault(key, [0, 0])[1] = stream_share(limit)
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

    @classmethod
    def take_stream(cls) -> bool:
        """Count a status stream as open, if the loop's share allows one more (see :func:`stream_share`)."""
        count = cls._streams.get(asyncio.get_running_loop())
        if count is None or count[0] >= count[1]:
            return False
        count[0] += 1
        return True

    @classmethod
    def give_back_stream(cls) -> None:
        count = cls._streams.get(asyncio.get_running_loop())
        if count is not None and count[0] > 0:
            count[0] -= 1


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
