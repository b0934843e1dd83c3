"""Server-Sent Events, as fal's status stream sends them: ``data:`` lines, ``: ping`` comments.

:func:`open_event_stream` opens one (the hook reads it); :class:`SSEParser` reads its lines.

Only ``data:`` fields carry anything for fal (``event:``, ``id:`` and ``retry:`` are unused);
an event ends at a blank line. A line-at-a-time parser rather than an async generator: the
hook's read loop stays the only frame a waiting stream holds, which thousands of waits in
one triggerer each keep alive.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from airflow_flux.exceptions import FluxAPIError
from airflow_flux.hooks.responses import api_error, parse_json, transport_error

if TYPE_CHECKING:
    import aiohttp

    from airflow_flux.hooks.settings import FluxConnectionSettings

#: fal pings an SSE stream every 15 s; a stream silent for much longer than that is dead.
STREAM_READ_TIMEOUT = 60.0


def line_too_long() -> tuple[type[Exception], ...]:
    """What reading a line longer than aiohttp's limit raises (ValueError in older aiohttp)."""
    from aiohttp.http_exceptions import HttpProcessingError

    return (ValueError, HttpProcessingError)


def line_limit(resp: aiohttp.ClientResponse) -> str:
    """`` (N bytes)``: the longest line ``resp.content`` reads, twice its read buffer (512 KiB
    with aiohttp 3.14). From a private attribute, only to word the warning: empty without it.
    """
    limit = getattr(resp.content, "_high_water", None)
    return f" ({limit} bytes)" if isinstance(limit, int) else ""


async def open_event_stream(
    session: aiohttp.ClientSession,
    settings: FluxConnectionSettings,
    url: str,
    *,
    logs: bool,
    request_id: str,
    what: str,
) -> aiohttp.ClientResponse:
    """One attempt at opening the event stream at ``url`` (the caller's retry policy repeats it).

    :param session: the loop's shared session.
    :param settings: the connection's settings (the URL guard, the token).
    :param url: the request's ``{status_url}/stream``, before :meth:`~FluxConnectionSettings.resolve`.
    :param logs: ask for the API's log lines with each event.
    :param request_id: for error messages.
    :param what: how errors name the call.
    :raises FluxAPIError: a refusal, or an answer that is not an event stream.
    """
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeout, sock_read=STREAM_READ_TIMEOUT)
    try:
        resp = await session.get(
            settings.resolve(url),
            params={"logs": "1" if logs else "0"},
            headers={**settings.headers, "Accept": "text/event-stream"},
            timeout=timeout,
            allow_redirects=False,
        )
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        # Opening a stream only reads: always safe to try again.
        raise transport_error(what, exc, request_id, True) from exc
    if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
        raw = await resp.read()
        resp.release()
        if 200 <= resp.status < 300:
            raise FluxAPIError(
                f"{what}: the API answered {resp.content_type or 'no content type'}, not an event stream",
                status_code=resp.status,
                request_id=request_id,
            )
        raise api_error(resp.status, resp.headers, parse_json(raw), raw, what=what, request_id=request_id)
    return resp


class SSEParser:
    """Feed it the raw lines of a ``text/event-stream`` body; it returns each event's data."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, raw_line: bytes) -> str | None:
        """The data of the event that ``raw_line`` ends, or None while an event is incomplete."""
        line = raw_line.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith(":"):
            return None  # comment (fal's ": ping" keep-alive)
        if line.startswith("data:"):
            self._data.append(line[5:].lstrip(" "))
            return None
        if line or not self._data:
            return None  # other fields (event:, id:, retry:) are unused by fal
        event, self._data = "\n".join(self._data), []
        return event
