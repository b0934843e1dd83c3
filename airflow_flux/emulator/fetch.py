"""Input images of edit and multi jobs, loaded the way fal loads them.

When a job with input images leaves the queue, every input is loaded at once (concurrently):
an ``http(s)://`` URL with a plain aiohttp GET that carries no credentials (no
``Authorization`` header; user info in the URL is dropped), a ``data:`` URI by decoding it.
Pillow then has to decode the bytes (off the event loop). Each attempt is kept as an
:class:`~airflow_flux.emulator.scenarios.InputFetch` on ``Job.input_fetches``.

An input that cannot be loaded (unsupported scheme, connection error, timeout, non-2xx,
too large, not an image) fails the request the way fal fails it: the job ends COMPLETED and
its result answers 422 ``image_load_error`` naming the field and echoing the URL (see
``outputs``). Under a concurrency limit the job's start may move earlier, or become known,
while it waits (``accounts``), which wakes the wait; once the fetch is over the job's end is
known and its account is scheduled again. A mixin on :class:`~airflow_flux.emulator.core._CoreState`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import time
import urllib.parse
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from airflow_flux.emulator import images
from airflow_flux.emulator.core import _CoreState
from airflow_flux.emulator.scenarios import InputFetch

if TYPE_CHECKING:
    from airflow_flux.emulator.jobs import Job

#: Inputs larger than this are refused (fal's own limit is not documented).
MAX_INPUT_BYTES = 50 * 1024 * 1024
_USER_AGENT = "flux-emulator-input-fetch/1.0"
_MSG_URL_CHARS = 80


def _short(url: str) -> str:
    """The URL as quoted in messages: data: URIs are cut short, anything else is echoed whole."""
    if url.startswith("data:") and len(url) > _MSG_URL_CHARS:
        return url[:_MSG_URL_CHARS] + "…"
    return url


def load_error(fetch: InputFetch) -> dict[str, Any]:
    """fal's 422 ``detail`` item for an input that could not be loaded."""
    transport = fetch.scheme in ("http", "https") and not (fetch.error or "").startswith("not an image")
    verb = "download" if transport else "load"
    return {
        "loc": list(fetch.loc),
        "msg": f"Could not {verb} the image at {_short(fetch.url)}: {fetch.error}",
        "type": "image_load_error",
        "input": fetch.url,
    }


def _decode_data_uri(url: str) -> tuple[bytes, str | None]:
    """Bytes and media type of a ``data:`` URI; raises ValueError if malformed."""
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep:
        raise ValueError("malformed data URI (no comma)")
    params = header.split(";")
    media_type = params[0] or None
    if "base64" in (p.strip().lower() for p in params[1:]):
        compact = "".join(urllib.parse.unquote(payload).split())
        try:
            return base64.b64decode(compact, validate=True), media_type
        except (binascii.Error, ValueError):
            raise ValueError("invalid base64 in data URI") from None
    return urllib.parse.unquote_to_bytes(payload), media_type


def _check_image(fetch: InputFetch, data: bytes) -> InputFetch:
    """Fill in size/hash and whether Pillow can decode ``data`` (runs in a worker thread)."""
    fetch.byte_count = len(data)
    fetch.sha256 = hashlib.sha256(data).hexdigest()
    try:
        fetch.width, fetch.height, fetch.image_format = images.probe_image(data)
    except Exception as exc:  # Pillow raises many types for bad input
        fetch.error = f"not an image ({exc or type(exc).__name__})"
    return fetch


class _InputFetchHandlers(_CoreState):
    """Schedules and runs the input fetches of edit/multi jobs (no routes of its own)."""

    def on_started(self) -> None:
        super().on_started()
        # After a restart, fetches the old loop did not finish start again.
        with self.lock:
            pending = [j for j in self.jobs.values() if j.inputs_pending]
        for job in pending:
            self._schedule_input_fetch(job)

    def _schedule_input_fetch(self, job: Job) -> None:
        """Load the job's inputs once it leaves the queue (on the server's loop)."""
        task = asyncio.get_running_loop().create_task(self._fetch_inputs_when_started(job))
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    async def _fetch_inputs_when_started(self, job: Job) -> None:
        # Loop: the event loop's clock may wake a hair before time.time() says it is time, and
        # the start can change while waiting (``Job.notify``: a slot freed, a gate released).
        while not self.closing:
            wakeup = job.wakeup
            now = time.time()
            start, end = job.queue_end, job.end_time
            if start is not None and start <= now:
                break
            if end is not None and end <= now:
                return  # cancelled / timed out in the queue: never fetched
            # A start not known yet (a held gate, no free slot) is woken when it is known.
            known = [t for t in (start, end) if t is not None]
            delay = min(known) - now + 0.001 if known else None
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wakeup.wait(), delay)
        if self.closing or not job.started:
            return  # shutting down, or cancelled / timed out in the queue: never fetched
        try:
            results = await self._fetch_all(job)
        except Exception as exc:  # a bug here must not leave the job IN_PROGRESS forever
            results = [
                (InputFetch(field=label, loc=list(loc), url=url, scheme="", error=f"emulator error ({exc!r})"), None)
                for label, loc, url in job.input_refs
            ]
        ok_images = [data for fetch, data in results if fetch.ok and data is not None]
        with self.lock:
            job.input_fetches = [fetch for fetch, _ in results]
            job.input_images = ok_images
            job.input_errors = [load_error(fetch) for fetch, _ in results if not fetch.ok]
            job.inputs_done_at = time.time()
        # Under a limit, the slot it holds frees when the job ends, known from now on.
        self._reschedule(job, job.inputs_done_at)

    async def _fetch_all(self, job: Job) -> list[tuple[InputFetch, bytes | None]]:
        timeout = aiohttp.ClientTimeout(total=self.input_fetch_timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            return list(
                await asyncio.gather(*(self._fetch_one(session, label, loc, url) for label, loc, url in job.input_refs))
            )

    async def _fetch_one(
        self, session: aiohttp.ClientSession, label: str, loc: list[str | int], url: str
    ) -> tuple[InputFetch, bytes | None]:
        scheme = url.partition(":")[0].lower() if ":" in url else ""
        fetch = InputFetch(field=label, loc=list(loc), url=url, scheme=scheme, started_at=time.time())
        data: bytes | None = None
        loop = asyncio.get_running_loop()
        try:
            if scheme == "data":
                data, fetch.content_type = await loop.run_in_executor(self.executor, _decode_data_uri, url)
            elif scheme in ("http", "https"):
                data = await self._http_get(session, fetch)
            else:
                fetch.error = f"unsupported URL scheme {scheme!r}" if scheme else "not a URL"
        except ValueError as exc:
            fetch.error = str(exc)
        if data is not None and fetch.error is None:
            fetch = await loop.run_in_executor(self.executor, _check_image, fetch, data)
        fetch.finished_at = time.time()
        return fetch, data if fetch.ok else None

    async def _http_get(self, session: aiohttp.ClientSession, fetch: InputFetch) -> bytes | None:
        """A plain GET of ``fetch.url``; fills in status/headers/error, returns the body if 2xx."""
        try:
            target = URL(fetch.url, encoded=True).with_user(None)
        except (ValueError, TypeError) as exc:
            fetch.error = f"invalid URL ({exc})"
            return None
        fetch.headers_sent = {"User-Agent": _USER_AGENT}
        try:
            async with session.get(target, headers={"User-Agent": _USER_AGENT}, allow_redirects=True) as resp:
                fetch.status = resp.status
                fetch.headers_sent = dict(resp.request_info.headers)
                fetch.authorization_sent = any(k.lower() == "authorization" for k in fetch.headers_sent)
                fetch.content_type = resp.headers.get("Content-Type")
                if not 200 <= resp.status < 300:
                    fetch.error = f"HTTP {resp.status}"
                    return None
                if (resp.content_length or 0) > MAX_INPUT_BYTES:
                    fetch.error = f"larger than {MAX_INPUT_BYTES // (1024 * 1024)} MB"
                    return None
                body = bytearray()
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    body += chunk
                    if len(body) > MAX_INPUT_BYTES:
                        fetch.error = f"larger than {MAX_INPUT_BYTES // (1024 * 1024)} MB"
                        fetch.byte_count = len(body)
                        return None
                return bytes(body)
        except asyncio.TimeoutError:
            fetch.error = f"timed out after {self.input_fetch_timeout:g} s"
        except aiohttp.ClientError as exc:
            fetch.error = f"connection failed ({type(exc).__name__}: {exc})"
        return None
