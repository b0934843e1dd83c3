"""FluxHook: the provider's only HTTP client of fal's queue API.

Sync methods (requests) serve workers; ``a``-prefixed twins (aiohttp) serve the
triggerer and never block its event loop. Both are built from one description of each call
(:mod:`~airflow_flux.hooks.calls`) and go through the same URL guard (the token is only
ever sent to the connection's host and its ``trusted_hosts``,
:mod:`~airflow_flux.hooks.settings`), the same answer parsing
(:mod:`~airflow_flux.hooks.responses`) and the same
:class:`~airflow_flux.hooks.retry.RetryPolicy`; they differ only in the transport.
"""

from __future__ import annotations

import asyncio
import time
from functools import cached_property
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.providers.common.compat.sdk import AirflowNotFoundException
from airflow.sdk import BaseHook
from pydantic import ValidationError

from airflow_flux.exceptions import (
    FluxAPIError,
    FluxAuthError,
    FluxError,
    FluxStreamsBusyError,
    FluxTimeoutError,
    FluxTransportError,
)
from airflow_flux.hooks.calls import (
    ApiCall,
    HandleLike,
    cancel_call,
    handle_from,
    probe_call,
    result_call,
    status_call,
    submit_call,
)
from airflow_flux.hooks.download import open_image
from airflow_flux.hooks.egress import ImageHostPolicy, image_session
from airflow_flux.hooks.form import connection_form_widgets, ui_field_behaviour
from airflow_flux.hooks.polling import next_poll_interval
from airflow_flux.hooks.responses import transport_error
from airflow_flux.hooks.retry import DEFAULT_RETRY_POLICY, RetryPolicy, aresend_with_new_credentials
from airflow_flux.hooks.settings import DEFAULT_BASE_URL, FluxConnectionSettings
from airflow_flux.hooks.shared import SettingsCache, SharedSessions
from airflow_flux.hooks.sse import SSEParser, line_limit, line_too_long, open_event_stream
from airflow_flux.identity import DEFAULT_CONN_ID
from airflow_flux.models import FluxStatus

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
    from contextlib import AbstractContextManager

    import aiohttp
    import requests
    from pydantic import BaseModel

    from airflow_flux.hooks.download import ImageStream
    from airflow_flux.models import FluxRequestHandle, FluxResult, RequestOptions

__all__ = ["DEFAULT_BASE_URL", "FluxConnectionSettings", "FluxHook", "HandleLike"]

T = TypeVar("T")


class FluxHook(BaseHook):
    """Talks to fal's queue API (or an aggregator reselling it) for FLUX.1 Kontext [pro].

    The connection's ``host`` is the base URL (default ``https://queue.fal.run``),
    ``password`` the API token; ``extra`` may set ``auth_scheme`` (``Key`` | ``Bearer`` |
    ``auto``), ``endpoint``, ``rebase_urls`` (``true`` | ``false`` | ``auto``, or the connection
    form's ``on`` | ``off``), ``trusted_hosts``, ``timeout``, and for image downloads
    ``allowed_image_hosts`` and ``max_image_mib``; ``auto`` or absent: from the host.

    :param flux_conn_id: the ``flux`` connection to use.
    :param retry_policy: overrides the default :class:`RetryPolicy`.
    """

    conn_name_attr = "flux_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "flux"
    hook_name = "FLUX (fal queue API)"

    @classmethod
    def get_connection_form_widgets(cls) -> dict[str, Any]:
        """The form's extra fields on Airflow 3.1 (3.2+ reads the provider info): :mod:`.form`."""
        return connection_form_widgets()

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """The form's standard fields on Airflow 3.1 (3.2+ reads the provider info)."""
        return ui_field_behaviour()

    def __init__(
        self,
        flux_conn_id: str = default_conn_name,
        *,
        retry_policy: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.flux_conn_id = flux_conn_id
        self.retry_policy = retry_policy or DEFAULT_RETRY_POLICY
        self._asession: aiohttp.ClientSession | None = None

    # -- connection -----------------------------------------------------------------

    @cached_property
    def settings(self) -> FluxConnectionSettings:
        """Settings of the connection, read with the sync API (workers only)."""
        settings = FluxConnectionSettings.from_connection(self.get_connection(self.flux_conn_id))
        if settings.token:
            from airflow.sdk.log import mask_secret

            mask_secret(settings.token)
        return settings

    async def aget_settings(self) -> FluxConnectionSettings:
        """Settings of the connection, read without blocking the event loop (triggerer).

        Shared for :data:`SETTINGS_TTL` seconds by every hook of the same connection on the
        same event loop (:class:`SettingsCache`), then read again: not kept by the hook, so a
        wait of hours sees a rotated token within the TTL without a lookup per call.
        """
        return await SettingsCache.get(self.flux_conn_id, self._aload_settings)

    async def _areread(self, stale: FluxConnectionSettings) -> FluxConnectionSettings | None:
        """After a 401/403: the connection read again, or None if its credentials are unchanged."""
        fresh = await SettingsCache.reload(self.flux_conn_id, stale, self._aload_settings)
        return None if fresh.headers == stale.headers else fresh

    async def _aload_settings(self) -> FluxConnectionSettings:
        conn = await BaseHook.aget_connection(self.flux_conn_id)
        settings = FluxConnectionSettings.from_connection(conn)
        if settings.token:
            from airflow_flux.compat import amask_secret

            await amask_secret(settings.token)
        return settings

    def get_conn(self) -> requests.Session:
        """The requests session used for sync calls."""
        return self._session

    @cached_property
    def _session(self) -> requests.Session:
        import requests
        from requests.adapters import HTTPAdapter

        session = requests.Session()
        # Retries are the RetryPolicy's job: keep urllib3's own retries out of the way.
        session.mount("https://", HTTPAdapter(max_retries=0))
        session.mount("http://", HTTPAdapter(max_retries=0))
        return session

    def resolve_handle(self, handle: HandleLike) -> FluxRequestHandle:
        """A full handle from a handle, a dict or a bare request id (URLs built from the connection)."""
        return handle_from(handle, self.settings, self.flux_conn_id)

    # -- transports: the only code that sends anything --------------------------------------

    def _run(self, call: ApiCall[T]) -> T:
        try:
            body = self._send(call)
        except FluxAPIError as exc:
            if call.on_error is None:
                raise
            return call.on_error(exc)
        return call.parse(body)

    def _send(self, call: ApiCall[Any]) -> Any:
        import requests

        settings = self.settings
        target = settings.resolve(call.url)

        def attempt() -> Any:
            try:
                resp = self._session.request(
                    call.method,
                    target,
                    json=call.json_body,
                    params=call.params,
                    headers={**settings.headers, **(call.headers or {})},
                    timeout=settings.timeout,
                    # A redirect could carry the token elsewhere: treat it as an error.
                    allow_redirects=False,
                )
            except requests.ConnectionError as exc:
                # Connection refused/reset: the request may not have arrived; retry only
                # where repeating it cannot pay twice (or where it never left: connect errors).
                raise transport_error(call.what, exc, call.request_id, call.idempotent or _connect_failed(exc)) from exc
            except requests.Timeout as exc:
                raise transport_error(call.what, exc, call.request_id, call.idempotent) from exc
            return call.answer(resp.status_code, resp.headers, resp.content)

        return self.retry_policy.call(attempt)

    async def _arun(self, call: ApiCall[T]) -> T:
        try:
            body = await self._asend(call)
        except FluxAPIError as exc:
            if call.on_error is None:
                raise
            return call.on_error(exc)
        return call.parse(body)

    async def _asend(self, call: ApiCall[Any]) -> Any:
        settings = await self.aget_settings()
        return await aresend_with_new_credentials(lambda s: self._asend_with(s, call), settings, self._areread)

    async def _asend_with(self, settings: FluxConnectionSettings, call: ApiCall[Any]) -> Any:
        import aiohttp

        target = settings.resolve(call.url)
        session = await self._aget_session()
        timeout = aiohttp.ClientTimeout(total=settings.timeout)

        async def attempt() -> Any:
            try:
                async with session.request(
                    call.method,
                    target,
                    json=call.json_body,
                    params=call.params,
                    headers={**settings.headers, **(call.headers or {})},
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    raw = await resp.read()
                    return call.answer(resp.status, resp.headers, raw)
            except aiohttp.ClientConnectorError as exc:
                # The connection was never made: nothing was sent, repeating it is safe.
                raise transport_error(call.what, exc, call.request_id, True) from exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise transport_error(call.what, exc, call.request_id, call.idempotent) from exc

        return await self.retry_policy.acall(attempt)

    # -- sync API (workers) --------------------------------------------------------------

    def submit(
        self,
        request: BaseModel | Mapping[str, Any],
        *,
        endpoint: str | None = None,
        webhook_url: str | None = None,
        options: RequestOptions | None = None,
    ) -> FluxRequestHandle:
        """Validate ``request`` and queue it; return the handle of the new request.

        :param request: a request model or a plain mapping, validated the same way first.
        :param endpoint: fal model path; defaults to the connection's ``endpoint``.
        :param webhook_url: optional ``fal_webhook`` to notify on completion.
        :param options: fal's request options (start deadline, queue priority).
        :raises FluxValidationError: before any call, when the request is invalid.
        """
        return self._run(
            submit_call(
                self.settings, self.flux_conn_id, request, endpoint=endpoint, webhook_url=webhook_url, options=options
            )
        )

    def get_status(self, handle: HandleLike, *, logs: bool = True) -> FluxStatus:
        """Current status of a request (``IN_QUEUE``, ``IN_PROGRESS`` or ``COMPLETED``)."""
        return self._run(status_call(self.resolve_handle(handle), logs=logs))

    def get_result(self, handle: HandleLike) -> FluxResult:
        """The result of a completed request (images, seed, NSFW flags, timings)."""
        return self._run(result_call(self.resolve_handle(handle)))

    def cancel(self, handle: HandleLike) -> str:
        """Ask the API to cancel a request; returns ``CANCELLATION_REQUESTED``,
        ``ALREADY_COMPLETED`` or ``NOT_FOUND``.
        """
        return self._run(cancel_call(self.resolve_handle(handle)))

    def wait_for_completion(
        self,
        handle: HandleLike,
        *,
        timeout: float,
        poll_interval: float = 1.0,
        max_poll_interval: float = 30.0,
        logs: bool = True,
        on_status: Callable[[FluxStatus], None] | None = None,
    ) -> FluxStatus:
        """Poll until the request is ``COMPLETED`` (with or without an error) and return that status.

        The worker's blocking wait (no triggerer): the trigger's polling schedule
        (:func:`~airflow_flux.hooks.polling.next_poll_interval`) with the sync calls.

        :param handle: the request.
        :param timeout: seconds to wait in all.
        :param poll_interval: first polling interval, seconds.
        :param max_poll_interval: cap of the polling interval, seconds.
        :param logs: ask for the API's log lines with each status.
        :param on_status: called with every status (progress lines in the task log).
        :raises FluxTimeoutError: not completed within ``timeout`` (the request is left as is:
            the caller decides whether to cancel it).
        """
        h = self.resolve_handle(handle)
        started = time.time()
        deadline = started + timeout
        polls = 0
        while True:
            status = self.get_status(h, logs=logs)
            if on_status is not None:
                on_status(status)
            if status.is_completed:
                return status
            if time.time() >= deadline:
                raise FluxTimeoutError(f"FLUX request {h.request_id} did not complete within the timeout.")
            delay = next_poll_interval(
                polls,
                time.time() - started,
                initial=poll_interval,
                maximum=max_poll_interval,
                queue_position=status.queue_position,
            )
            polls += 1
            time.sleep(max(0.0, min(delay, deadline - time.time())))

    def test_connection(self) -> tuple[bool, str]:
        """Make one cheap authenticated call and say whether the token was accepted.

        Asks for the status of a request id that cannot exist: an accepted token gets
        "not found" (or another non-auth answer), a refused one gets 401/403.
        """
        try:
            self._run(probe_call(self.settings))
        except FluxAuthError as exc:
            return False, f"The API at {self.settings.base_url} refused the token: {exc}"
        except FluxTransportError as exc:
            return False, str(exc)
        except FluxAPIError as exc:
            if exc.status_code < 500:
                return True, f"Token accepted by {self.settings.base_url} (probe answered HTTP {exc.status_code})."
            return False, str(exc)
        except FluxError as exc:
            return False, str(exc)
        return True, f"Token accepted by {self.settings.base_url}."

    # -- image download (allowed hosts only, never sent the token) ------------------------

    @cached_property
    def image_policy(self) -> ImageHostPolicy:
        """Where this connection's images may come from (:mod:`~airflow_flux.hooks.egress`);
        without the connection, fal's media CDN only."""
        try:
            policy = self.settings.image_policy
        except AirflowNotFoundException:
            policy = None
        return (policy or ImageHostPolicy(conn_id=None)).model_copy(update={"conn_id": self.flux_conn_id})

    @cached_property
    def _cdn_session(self) -> requests.Session:
        return image_session(self.image_policy)

    def open_image(self, url: str, *, timeout: float = 60.0) -> AbstractContextManager[ImageStream]:
        """An image URL on an allowed host (no token sent) or a ``data:`` URI, streamed (:func:`open_image`)."""
        policy, retry = self.image_policy, self.retry_policy
        return open_image(self._cdn_session, url, policy=policy, retry_policy=retry, timeout=timeout)

    # -- async API (triggerer) ----------------------------------------------------------

    async def __aenter__(self) -> FluxHook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let go of the event loop's shared aiohttp session (closed with its last user)."""
        if self._asession is not None:
            self._asession = None
            await SharedSessions.release()

    async def _aget_session(self) -> aiohttp.ClientSession:
        if self._asession is None or self._asession.closed:
            self._asession = await SharedSessions.acquire()
        return self._asession

    async def asubmit(
        self,
        request: BaseModel | Mapping[str, Any],
        *,
        endpoint: str | None = None,
        webhook_url: str | None = None,
        options: RequestOptions | None = None,
    ) -> FluxRequestHandle:
        """Async twin of :meth:`submit`."""
        settings = await self.aget_settings()
        return await self._arun(
            submit_call(
                settings, self.flux_conn_id, request, endpoint=endpoint, webhook_url=webhook_url, options=options
            )
        )

    async def aget_status(self, handle: HandleLike, *, logs: bool = True) -> FluxStatus:
        """Async twin of :meth:`get_status`."""
        h = handle_from(handle, await self.aget_settings(), self.flux_conn_id)
        return await self._arun(status_call(h, logs=logs))

    async def aget_result(self, handle: HandleLike) -> FluxResult:
        """Async twin of :meth:`get_result`."""
        h = handle_from(handle, await self.aget_settings(), self.flux_conn_id)
        return await self._arun(result_call(h))

    async def acancel(self, handle: HandleLike) -> str:
        """Async twin of :meth:`cancel`."""
        h = handle_from(handle, await self.aget_settings(), self.flux_conn_id)
        return await self._arun(cancel_call(h))

    async def astream_status(self, handle: HandleLike, *, logs: bool = True) -> AsyncGenerator[FluxStatus, None]:
        """Follow a request over Server-Sent Events (``{status_url}/stream``).

        Yields each status the API pushes and returns after ``COMPLETED``. Opening the
        stream follows the retry policy; a refusal (e.g. an aggregator that does not proxy
        SSE) raises :class:`FluxAPIError` and a stream that ends or stalls before
        ``COMPLETED`` raises :class:`FluxTransportError`, so the caller can fall back to polling;
        so does an event longer than aiohttp's line limit. When the loop's share of streams is
        open (:func:`~airflow_flux.hooks.shared.stream_share`) it raises
        :class:`FluxStreamsBusyError` before any call: poll instead.
        """

        import aiohttp

        settings = await self.aget_settings()
        h = handle_from(handle, settings, self.flux_conn_id)
        status_url = h.status_url.rstrip("/") + "/stream"
        # Only the id is needed from here on; the frame lives as long as the wait.
        request_id = h.request_id
        del h
        session = await self._aget_session()
        what = "Status stream"

        def open_stream(settings: FluxConnectionSettings) -> Awaitable[aiohttp.ClientResponse]:
            return self.retry_policy.acall(
                lambda: open_event_stream(session, settings, status_url, logs=logs, request_id=request_id, what=what)
            )

        if not SharedSessions.take_stream():
            raise FluxStreamsBusyError(f"{what}: every stream this triggerer may hold is open ({request_id})")
        try:
            resp = await aresend_with_new_credentials(open_stream, settings, self._areread)
        except BaseException:
            SharedSessions.give_back_stream()
            raise
        del open_stream  # not held for the whole wait
        try:
            parser = SSEParser()
            try:
                async for raw_line in resp.content:
                    event = parser.feed(raw_line)
                    if event is None:
                        continue
                    try:
                        status = FluxStatus.model_validate_json(event)
                    except ValidationError:
                        self.log.warning("Ignoring a malformed event on the status stream of %s", request_id)
                        continue
                    yield status
                    if status.is_completed:
                        return
                    # Nothing of this event is needed while waiting for the next one, which
                    # may be minutes away: thousands of waits would each hold it.
                    del status, event, raw_line
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise transport_error(what, exc, request_id, True) from exc
            except line_too_long() as exc:
                # A long log with logs=1 can do it; a poll reads whole bodies, without that limit.
                msg = f"{what}: an event longer than aiohttp's line limit{line_limit(resp)}"
                raise FluxTransportError(msg, request_id=request_id) from exc
            raise FluxTransportError(f"{what}: the stream ended before the request completed", request_id=request_id)
        finally:
            # close(), not release(): an unfinished event stream must not go back to the pool.
            resp.close()
            SharedSessions.give_back_stream()


def _connect_failed(exc: requests.ConnectionError) -> bool:
    """Whether a requests ``ConnectionError`` happened before anything was sent, by its type."""
    import requests
    import urllib3.exceptions

    if isinstance(exc, requests.ConnectTimeout):
        return True
    # requests wraps urllib3's MaxRetryError, whose reason is the failure itself;
    # NewConnectionError covers a refused connection and a failed name lookup.
    reason = exc.args[0] if exc.args else None
    reason = getattr(reason, "reason", reason)
    return isinstance(reason, urllib3.exceptions.NewConnectionError)
