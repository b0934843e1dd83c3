"""FluxHook: the provider's only HTTP client of fal's queue API.

Sync methods (requests) serve workers; ``a``-prefixed twins (aiohttp) serve the
triggerer and never block its event loop. Both go through the same URL guard (the token
is only ever sent to the connection's host and its ``trusted_hosts``), the same error
parsing and the same :class:`~airflow_flux.hooks.retry.RetryPolicy`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from airflow.sdk import BaseHook
from pydantic import BaseModel, ValidationError

from airflow_flux.exceptions import (
    FluxAPIError,
    FluxAuthError,
    FluxConfigError,
    FluxError,
    FluxIntegrityError,
    FluxResultExpiredError,
    FluxTransportError,
    FluxUntrustedURLError,
)
from airflow_flux.hooks.retry import (
    DEFAULT_RETRY_POLICY,
    RESUBMIT_SAFE_STATUS,
    RetryPolicy,
    is_retryable_status,
    parse_retry_after,
)
from airflow_flux.identity import DEFAULT_CONN_ID
from airflow_flux.models import (
    KONTEXT_TEXT_TO_IMAGE,
    FluxRequestHandle,
    FluxResult,
    FluxStatus,
    build_payload,
)

if TYPE_CHECKING:
    import aiohttp
    import requests
    from airflow.sdk import Connection

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://queue.fal.run"
#: fal's own queue hosts: a connection on one of them uses ``Key`` auth and trusts both.
FAL_QUEUE_HOSTS: frozenset[str] = frozenset({"queue.fal.run", "queue.falrun.com"})
DEFAULT_TIMEOUT = 60.0
#: fal pings an SSE stream every 15 s; a stream silent for much longer than that is dead.
STREAM_READ_TIMEOUT = 60.0
_MAX_DETAIL_CHARS = 1000

HandleLike = FluxRequestHandle | Mapping[str, Any] | str


def _is_fal_host(hostname: str) -> bool:
    return hostname in FAL_QUEUE_HOSTS or hostname.endswith((".fal.run", ".falrun.com"))


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def _host_key(url: str) -> tuple[str, int | None]:
    parts = urlsplit(url)
    return (parts.hostname or "").lower(), parts.port


@dataclass(frozen=True)
class FluxConnectionSettings:
    """Everything the hook needs from a ``flux`` connection, resolved once.

    Build it with :meth:`from_connection`; ``token`` is excluded from ``repr`` so the
    settings can be logged.
    """

    base_url: str
    token: str = field(repr=False)
    auth_scheme: str
    endpoint: str
    rebase_urls: bool
    trusted_hosts: frozenset[str]
    timeout: float

    @classmethod
    def from_connection(cls, conn: Connection) -> FluxConnectionSettings:
        extra = conn.extra_dejson or {}

        def opt(name: str, default: Any = None) -> Any:
            # The connection form stores declarative fields with or without the prefix.
            for key in (name, f"extra__flux__{name}"):
                if extra.get(key) not in (None, ""):
                    return extra[key]
            return default

        base_url = cls._base_url(conn)
        hostname = (urlsplit(base_url).hostname or "").lower()
        fal = _is_fal_host(hostname)

        scheme = str(opt("auth_scheme", "Key" if fal else "Bearer")).strip()
        normalized = {"key": "Key", "bearer": "Bearer"}.get(scheme.lower())
        if normalized is None:
            raise FluxConfigError(
                f"Connection {conn.conn_id!r}: extra auth_scheme must be 'Bearer' or 'Key', got {scheme!r}"
            )

        trusted = opt("trusted_hosts", [])
        if isinstance(trusted, str):
            trusted = [h for h in trusted.replace(",", " ").split() if h]
        hosts = {urlsplit(base_url).netloc.lower()}
        if fal:
            hosts |= FAL_QUEUE_HOSTS
        hosts |= {str(h).strip().lower() for h in trusted}

        try:
            timeout = float(opt("timeout", DEFAULT_TIMEOUT))
        except (TypeError, ValueError):
            raise FluxConfigError(f"Connection {conn.conn_id!r}: extra timeout must be a number of seconds") from None

        return cls(
            base_url=base_url,
            token=conn.password or "",
            auth_scheme=normalized,
            endpoint=str(opt("endpoint", KONTEXT_TEXT_TO_IMAGE)).strip("/"),
            rebase_urls=_as_bool(opt("rebase_urls", not fal)),
            trusted_hosts=frozenset(hosts),
            timeout=timeout,
        )

    @staticmethod
    def _base_url(conn: Connection) -> str:
        host = (conn.host or "").strip()
        if not host:
            return DEFAULT_BASE_URL
        if "://" not in host:
            # URI-style connections split the URL: rebuild it (schema carries the scheme,
            # as in the http provider).
            scheme = (conn.schema or "https").strip()
            host = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FluxConfigError(f"Connection {conn.conn_id!r}: host must be an http(s) base URL, got {host!r}")
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"{self.auth_scheme} {self.token}", "Accept": "application/json"}

    def is_trusted(self, url: str) -> bool:
        parts = urlsplit(url)
        base = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https"):
            return False
        # Never downgrade to plain http on a host the base reaches over https.
        if parts.scheme == "http" and base.scheme == "https":
            return False
        hostname, port = _host_key(url)
        return parts.netloc.lower() in self.trusted_hosts or (port is None and hostname in self.trusted_hosts)

    def rebase(self, url: str) -> str:
        """Move ``url`` onto the connection's base URL, keeping path and query."""
        parts = urlsplit(url)
        base = urlsplit(self.base_url)
        path = parts.path
        if base.path and not (parts.netloc.lower() == base.netloc.lower() and path.startswith(base.path + "/")):
            path = base.path + path
        return urlunsplit((base.scheme, base.netloc, path, parts.query, ""))

    def resolve(self, url: str) -> str:
        """The URL to call with the token, or :class:`FluxUntrustedURLError`.

        With ``rebase_urls`` every returned URL is re-based (aggregators return fal's
        hosts and ask callers to rewrite them); without it, a URL on an untrusted host is
        refused rather than called, so the token cannot leak there.
        """
        if self.rebase_urls:
            return self.rebase(url)
        if not self.is_trusted(url):
            host = urlsplit(url).netloc or url
            raise FluxUntrustedURLError(
                f"Refusing to send the API token to {host!r}: it is not the connection's host "
                f"({urlsplit(self.base_url).netloc}) nor in its trusted_hosts. Set extra "
                "'rebase_urls': true for an aggregator, or add the host to 'trusted_hosts'."
            )
        return url


class FluxHook(BaseHook):
    """Talks to fal's queue API (or an aggregator reselling it) for FLUX.1 Kontext [pro].

    The connection's ``host`` is the base URL (default ``https://queue.fal.run``),
    ``password`` the API token; ``extra`` may set ``auth_scheme`` (``Key`` | ``Bearer``),
    ``endpoint``, ``rebase_urls``, ``trusted_hosts`` and ``timeout``.

    :param flux_conn_id: the ``flux`` connection to use.
    :param retry_policy: overrides the default :class:`RetryPolicy`.
    """

    conn_name_attr = "flux_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "flux"
    hook_name = "FLUX (fal queue API)"

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
        self._asettings: FluxConnectionSettings | None = None
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
        same event loop (see :class:`_SettingsCache`).
        """
        if self._asettings is None:
            self._asettings = await _SettingsCache.get(self.flux_conn_id, self._aload_settings)
        return self._asettings

    async def _aload_settings(self) -> FluxConnectionSettings:
        conn = await BaseHook.aget_connection(self.flux_conn_id)
        settings = FluxConnectionSettings.from_connection(conn)
        if settings.token:
            from airflow.sdk.log import amask_secret

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
        return self._handle(handle, self.settings)

    # -- helpers shared by sync and async ---------------------------------------------

    def _handle(self, handle: HandleLike, settings: FluxConnectionSettings) -> FluxRequestHandle:
        if isinstance(handle, FluxRequestHandle):
            return handle
        if isinstance(handle, str):
            return FluxRequestHandle.for_request_id(
                handle, base_url=settings.base_url, endpoint=settings.endpoint, flux_conn_id=self.flux_conn_id
            )
        data = dict(handle)
        if not data.get("status_url") and data.get("request_id"):
            # A bare id: its URLs are built on this connection, so the handle is this connection's.
            endpoint = data.get("endpoint") or settings.endpoint
            return FluxRequestHandle.for_request_id(
                str(data["request_id"]), base_url=settings.base_url, endpoint=endpoint, flux_conn_id=self.flux_conn_id
            )
        try:
            return FluxRequestHandle.model_validate(data)
        except ValidationError as exc:
            raise FluxError(
                f"Not a FLUX request handle (needs request_id and its URLs): {exc.errors(include_url=False)}"
            ) from None

    @staticmethod
    def _parse_json(raw: bytes) -> Any:
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return None

    def _check(
        self,
        status: int,
        headers: Mapping[str, str],
        raw: bytes,
        *,
        what: str,
        request_id: str | None,
        idempotent: bool,
    ) -> Any:
        """Return the JSON body of a successful response or raise the typed API error."""
        body = self._parse_json(raw)
        if 200 <= status < 300:
            if raw and body is None:
                raise FluxAPIError(
                    f"{what}: the API answered HTTP {status} with a body that is not valid JSON",
                    status_code=status,
                    request_id=request_id,
                    retryable=idempotent,
                )
            return body
        error = self._error(status, headers, body, raw, what=what, request_id=request_id)
        if not idempotent and status not in RESUBMIT_SAFE_STATUS:
            error.retryable = False  # not idempotent: never risk paying twice
        raise error

    @staticmethod
    def _error(
        status: int,
        headers: Mapping[str, str],
        body: Any,
        raw: bytes,
        *,
        what: str,
        request_id: str | None,
    ) -> FluxAPIError:
        detail: str | None = None
        error_type = headers.get("X-Fal-Error-Type")
        if isinstance(body, Mapping):
            raw_detail = body.get("detail", body.get("error", body.get("status")))
            error_type = body.get("error_type") or error_type
            if isinstance(raw_detail, list):
                # fal's validation errors: [{"loc": [...], "msg": ..., "type": ...}, ...]
                parts = []
                for item in raw_detail:
                    if isinstance(item, Mapping):
                        loc = [str(p) for p in item.get("loc", []) if p != "body"]
                        parts.append(f"{'.'.join(loc) or 'request'}: {item.get('msg', '')}".strip())
                        error_type = error_type or item.get("type")
                    else:
                        parts.append(str(item))
                detail = "; ".join(parts)
            elif raw_detail is not None:
                detail = str(raw_detail)
        elif raw:
            detail = raw[:_MAX_DETAIL_CHARS].decode("utf-8", "replace")
        if detail and len(detail) > _MAX_DETAIL_CHARS:
            detail = detail[:_MAX_DETAIL_CHARS] + "..."

        retryable = is_retryable_status(status, headers)
        retry_after = parse_retry_after(headers.get("Retry-After")) if retryable else None
        message = f"{what} failed: HTTP {status}"
        if error_type:
            message += f" ({error_type})"
        if detail:
            message += f": {detail}"
        if request_id:
            message += f" [request_id={request_id}]"

        cls: type[FluxAPIError] = FluxAPIError
        if status in (401, 403):
            cls = FluxAuthError
        return cls(
            message,
            status_code=status,
            detail=detail,
            error_type=error_type,
            request_id=request_id,
            retryable=retryable,
            retry_after=retry_after,
            body=body,
        )

    @staticmethod
    def _result_error(exc: FluxAPIError, handle: FluxRequestHandle) -> FluxAPIError:
        # A 404 for a request we hold the handle of means fal dropped the result: it keeps
        # results for one hour after completion only.
        if exc.status_code == 404:
            return FluxResultExpiredError(
                f"The result of request {handle.request_id} is no longer available (HTTP 404): fal keeps "
                "results for 1 hour after completion (6 minutes for results of 10 KB or more). "
                "Fetch results as soon as requests complete.",
                status_code=404,
                detail=exc.detail,
                error_type=exc.error_type or "result_expired",
                request_id=handle.request_id,
            )
        return exc

    def _parse_handle(self, body: Any, settings: FluxConnectionSettings, endpoint: str) -> FluxRequestHandle:
        if not isinstance(body, Mapping) or not body.get("request_id"):
            raise FluxAPIError(
                f"Submit to {endpoint}: the API's answer has no request_id: {str(body)[:_MAX_DETAIL_CHARS]}",
                status_code=200,
            )
        request_id = str(body["request_id"])
        handle = FluxRequestHandle.for_request_id(request_id, base_url=settings.base_url, endpoint=endpoint)
        # Keep the API's own URLs when it gives them (re-based when so configured), so a
        # handle in XCom is what later calls use; fall back to the built ones.
        urls = {}
        for key in ("status_url", "response_url", "cancel_url"):
            url = body.get(key) or getattr(handle, key)
            urls[key] = settings.rebase(url) if settings.rebase_urls else url
        return FluxRequestHandle(request_id=request_id, endpoint=endpoint, flux_conn_id=self.flux_conn_id, **urls)

    # -- sync API (workers) --------------------------------------------------------------

    def _call(
        self,
        method: str,
        url: str,
        *,
        what: str,
        request_id: str | None = None,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> Any:
        import requests

        settings = self.settings
        target = settings.resolve(url)

        def attempt() -> Any:
            try:
                resp = self._session.request(
                    method,
                    target,
                    json=json_body,
                    params=params,
                    headers=settings.headers,
                    timeout=settings.timeout,
                    # A redirect could carry the token elsewhere: treat it as an error.
                    allow_redirects=False,
                )
            except requests.ConnectionError as exc:
                # Connection refused/reset: the request may not have arrived; retry only
                # where repeating it cannot pay twice (or where it never left: connect errors).
                raise self._transport_error(what, exc, request_id, idempotent or _connect_failed(exc)) from exc
            except requests.Timeout as exc:
                raise self._transport_error(
                    what, exc, request_id, idempotent or isinstance(exc, requests.ConnectTimeout)
                ) from exc
            return self._check(
                resp.status_code,
                resp.headers,
                resp.content,
                what=what,
                request_id=request_id,
                idempotent=idempotent,
            )

        return self.retry_policy.call(attempt)

    @staticmethod
    def _transport_error(what: str, exc: BaseException, request_id: str | None, retryable: bool) -> FluxTransportError:
        err = FluxTransportError(
            f"{what}: could not reach the API ({type(exc).__name__}: {exc})", request_id=request_id
        )
        err.retryable = retryable
        return err

    def submit(
        self,
        request: BaseModel | Mapping[str, Any],
        *,
        endpoint: str | None = None,
        webhook_url: str | None = None,
    ) -> FluxRequestHandle:
        """Validate ``request`` and queue it; return the handle of the new request.

        :param request: a request model or a plain mapping, validated the same way first.
        :param endpoint: fal model path; defaults to the connection's ``endpoint``.
        :param webhook_url: optional ``fal_webhook`` to notify on completion.
        :raises FluxValidationError: before any call, when the request is invalid.
        """
        settings = self.settings
        endpoint = (endpoint or settings.endpoint).strip("/")
        payload = build_payload(request, endpoint)
        body = self._call(
            "POST",
            f"{settings.base_url}/{endpoint}",
            what=f"Submit to {endpoint}",
            json_body=payload,
            params={"fal_webhook": webhook_url} if webhook_url else None,
            # Not idempotent: a resend after an ambiguous failure could pay for two images.
            idempotent=False,
        )
        handle = self._parse_handle(body, settings, endpoint)
        log.info("Submitted FLUX request %s to %s", handle.request_id, endpoint)
        return handle

    def get_status(self, handle: HandleLike, *, logs: bool = True) -> FluxStatus:
        """Current status of a request (``IN_QUEUE``, ``IN_PROGRESS`` or ``COMPLETED``)."""
        h = self._handle(handle, self.settings)
        body = self._call(
            "GET", h.status_url, what="Status check", request_id=h.request_id, params={"logs": "1" if logs else "0"}
        )
        return self._parse_status(body, h)

    def get_result(self, handle: HandleLike) -> FluxResult:
        """The result of a completed request (images, seed, NSFW flags, timings)."""
        h = self._handle(handle, self.settings)
        try:
            body = self._call("GET", h.response_url, what="Fetching the result", request_id=h.request_id)
        except FluxAPIError as exc:
            raise self._result_error(exc, h) from None
        return self._parse_result(body, h)

    def cancel(self, handle: HandleLike) -> str:
        """Ask the API to cancel a request; returns ``CANCELLATION_REQUESTED``,
        ``ALREADY_COMPLETED`` or ``NOT_FOUND``.
        """
        h = self._handle(handle, self.settings)
        try:
            body = self._call("PUT", h.cancel_url, what="Cancel", request_id=h.request_id)
        except FluxAPIError as exc:
            return self._cancel_outcome(exc, h)
        return str((body or {}).get("status", "CANCELLATION_REQUESTED"))

    def test_connection(self) -> tuple[bool, str]:
        """Make one cheap authenticated call and say whether the token was accepted.

        Asks for the status of a request id that cannot exist: an accepted token gets
        "not found" (or another non-auth answer), a refused one gets 401/403.
        """
        try:
            settings = self.settings
            probe = FluxRequestHandle.for_request_id(
                "00000000-0000-0000-0000-000000000000", base_url=settings.base_url, endpoint=settings.endpoint
            )
            self._call("GET", probe.status_url, what="Connection test")
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

    # -- image download (CDN: public, never sent the token) ----------------------------------

    @cached_property
    def _cdn_session(self) -> requests.Session:
        import requests
        from requests.adapters import HTTPAdapter

        # A session of its own with no auth header: image URLs are public CDN links on
        # hosts that must never see the API token.
        session = requests.Session()
        session.mount("https://", HTTPAdapter(max_retries=0, pool_maxsize=16))
        session.mount("http://", HTTPAdapter(max_retries=0, pool_maxsize=16))
        return session

    @contextmanager
    def open_image(self, url: str, *, timeout: float = 60.0) -> Iterator[ImageStream]:
        """Open a generated image for streaming: a CDN URL (no token sent) or a ``data:`` URI.

        Opening follows the retry policy; the returned stream verifies the byte count
        against ``Content-Length`` and hashes what it reads (SHA-256).
        """
        if url.startswith("data:"):
            yield ImageStream.from_data_uri(url)
            return
        if urlsplit(url).scheme not in ("http", "https"):
            raise FluxIntegrityError(f"Image URL has an unsupported scheme: {url[:100]!r}")
        import requests

        what = "Image download"

        def attempt() -> requests.Response:
            try:
                resp = self._cdn_session.get(url, stream=True, timeout=(min(timeout, 30.0), timeout))
            except requests.RequestException as exc:
                raise self._transport_error(what, exc, None, True) from exc
            if resp.status_code >= 300:
                raw = resp.content[:_MAX_DETAIL_CHARS]
                resp.close()
                raise self._error(
                    resp.status_code, resp.headers, self._parse_json(raw), raw, what=what, request_id=None
                )
            return resp

        resp = self.retry_policy.call(attempt)
        try:
            length = resp.headers.get("Content-Length")
            yield ImageStream(
                resp.raw,
                url=url,
                content_length=int(length) if length and length.isdigit() else None,
                content_type=resp.headers.get("Content-Type"),
            )
        finally:
            resp.close()

    # -- parsing shared by sync and async ---------------------------------------------------

    @staticmethod
    def _parse_status(body: Any, h: FluxRequestHandle) -> FluxStatus:
        try:
            return FluxStatus.model_validate(body)
        except ValidationError:
            raise FluxAPIError(
                f"Status check: unexpected answer from the API: {str(body)[:_MAX_DETAIL_CHARS]}",
                status_code=200,
                request_id=h.request_id,
                retryable=True,
            ) from None

    @staticmethod
    def _parse_result(body: Any, h: FluxRequestHandle) -> FluxResult:
        try:
            result = FluxResult.model_validate(body)
        except ValidationError as exc:
            raise FluxAPIError(
                f"Fetching the result: unexpected answer from the API: {exc.errors(include_url=False)}",
                status_code=200,
                request_id=h.request_id,
            ) from None
        if result.request_id is None:
            result = result.model_copy(update={"request_id": h.request_id})
        return result

    @staticmethod
    def _cancel_outcome(exc: FluxAPIError, h: FluxRequestHandle) -> str:
        # 400 ALREADY_COMPLETED / 404 NOT_FOUND are answers, not failures of the call.
        if exc.status_code in (400, 404) and isinstance(exc.body, Mapping) and exc.body.get("status"):
            return str(exc.body["status"])
        raise exc

    # -- async API (triggerer) ----------------------------------------------------------

    async def __aenter__(self) -> FluxHook:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let go of the event loop's shared aiohttp session (closed with its last user)."""
        if self._asession is not None:
            self._asession = None
            await _SharedSessions.release()

    async def _aget_session(self) -> aiohttp.ClientSession:
        if self._asession is None or self._asession.closed:
            self._asession = await _SharedSessions.acquire()
        return self._asession

    async def _acall(
        self,
        method: str,
        url: str,
        *,
        what: str,
        request_id: str | None = None,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        idempotent: bool = True,
    ) -> Any:
        import aiohttp

        settings = await self.aget_settings()
        target = settings.resolve(url)
        session = await self._aget_session()
        timeout = aiohttp.ClientTimeout(total=settings.timeout)

        async def attempt() -> Any:
            try:
                async with session.request(
                    method,
                    target,
                    json=json_body,
                    params=params,
                    headers=settings.headers,
                    timeout=timeout,
                    allow_redirects=False,
                ) as resp:
                    raw = await resp.read()
                    return self._check(
                        resp.status, resp.headers, raw, what=what, request_id=request_id, idempotent=idempotent
                    )
            except aiohttp.ClientConnectorError as exc:
                raise self._transport_error(what, exc, request_id, True) from exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise self._transport_error(what, exc, request_id, idempotent) from exc

        return await self.retry_policy.acall(attempt)

    async def asubmit(
        self, request: BaseModel | Mapping[str, Any], *, endpoint: str | None = None, webhook_url: str | None = None
    ) -> FluxRequestHandle:
        """Async twin of :meth:`submit`."""
        settings = await self.aget_settings()
        endpoint = (endpoint or settings.endpoint).strip("/")
        payload = build_payload(request, endpoint)
        body = await self._acall(
            "POST",
            f"{settings.base_url}/{endpoint}",
            what=f"Submit to {endpoint}",
            json_body=payload,
            params={"fal_webhook": webhook_url} if webhook_url else None,
            idempotent=False,
        )
        return self._parse_handle(body, settings, endpoint)

    async def aget_status(self, handle: HandleLike, *, logs: bool = True) -> FluxStatus:
        """Async twin of :meth:`get_status`."""
        h = self._handle(handle, await self.aget_settings())
        body = await self._acall(
            "GET", h.status_url, what="Status check", request_id=h.request_id, params={"logs": "1" if logs else "0"}
        )
        return self._parse_status(body, h)

    async def aget_result(self, handle: HandleLike) -> FluxResult:
        """Async twin of :meth:`get_result`."""
        h = self._handle(handle, await self.aget_settings())
        try:
            body = await self._acall("GET", h.response_url, what="Fetching the result", request_id=h.request_id)
        except FluxAPIError as exc:
            raise self._result_error(exc, h) from None
        return self._parse_result(body, h)

    async def acancel(self, handle: HandleLike) -> str:
        """Async twin of :meth:`cancel`."""
        h = self._handle(handle, await self.aget_settings())
        try:
            body = await self._acall("PUT", h.cancel_url, what="Cancel", request_id=h.request_id)
        except FluxAPIError as exc:
            return self._cancel_outcome(exc, h)
        return str((body or {}).get("status", "CANCELLATION_REQUESTED"))

    async def astream_status(self, handle: HandleLike, *, logs: bool = True) -> AsyncIterator[FluxStatus]:
        """Follow a request over Server-Sent Events (``{status_url}/stream``).

        Yields each status the API pushes and returns after ``COMPLETED``. Opening the
        stream follows the retry policy; a refusal (e.g. an aggregator that does not proxy
        SSE) raises :class:`FluxAPIError` and a stream that ends or stalls before
        ``COMPLETED`` raises :class:`FluxTransportError`, so the caller can fall back to polling.
        """

        import aiohttp

        settings = await self.aget_settings()
        h = self._handle(handle, settings)
        target = settings.resolve(h.status_url.rstrip("/") + "/stream")
        # Only the id is needed from here on; the frame lives as long as the wait.
        request_id = h.request_id
        del h
        session = await self._aget_session()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.timeout, sock_read=STREAM_READ_TIMEOUT)
        what = "Status stream"

        async def open_stream() -> aiohttp.ClientResponse:
            try:
                resp = await session.get(
                    target,
                    params={"logs": "1" if logs else "0"},
                    headers={**settings.headers, "Accept": "text/event-stream"},
                    timeout=timeout,
                    allow_redirects=False,
                )
            except aiohttp.ClientConnectorError as exc:
                raise self._transport_error(what, exc, request_id, True) from exc
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise self._transport_error(what, exc, request_id, True) from exc
            if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
                raw = await resp.read()
                resp.release()
                if 200 <= resp.status < 300:
                    raise FluxAPIError(
                        f"{what}: the API answered {resp.content_type or 'no content type'}, not an event stream",
                        status_code=resp.status,
                        request_id=request_id,
                    )
                raise self._error(
                    resp.status, resp.headers, self._parse_json(raw), raw, what=what, request_id=request_id
                )
            return resp

        resp: aiohttp.ClientResponse = await self.retry_policy.acall(open_stream)
        try:
            data: list[str] = []
            try:
                async for raw_line in resp.content:
                    line = raw_line.decode("utf-8", "replace").rstrip("\r\n")
                    if line.startswith(":"):
                        continue  # comment (fal's ": ping" keep-alive)
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                        continue
                    if line or not data:
                        continue  # other fields (event:, id:, retry:) are unused by fal
                    event, data = "\n".join(data), []
                    try:
                        status = FluxStatus.model_validate_json(event)
                    except ValidationError:
                        log.warning("Ignoring a malformed event on the status stream of %s", request_id)
                        continue
                    yield status
                    if status.is_completed:
                        return
                    # Nothing of this event is needed while waiting for the next one, which
                    # may be minutes away: thousands of waits would each hold it (~3 KB).
                    del status, event, line, raw_line
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise self._transport_error(what, exc, request_id, True) from exc
            raise FluxTransportError(f"{what}: the stream ended before the request completed", request_id=request_id)
        finally:
            # close(), not release(): an unfinished event stream must not go back to the pool.
            resp.close()


#: How long the triggerer reuses a connection's settings before reading it again.
SETTINGS_TTL = 60.0


class _SettingsCache:
    """Connection settings per event loop and connection id, kept for :data:`SETTINGS_TTL`.

    A triggerer starts thousands of waits on one connection, often in the same second.
    Reading the connection costs 0.3-0.45 ms of CPU per wait even from an env var (1.6-1.9 s
    of a 5,000-wait start-up, bench/RESULTS.md), and in a real triggerer each read is a round
    trip to its supervisor. Concurrent readers share one lookup; a failed lookup is not
    kept, and an edited connection is picked up by waits started after the TTL.
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


class _SharedSessions:
    """One aiohttp session per event loop, shared by every hook on it.

    The triggerer runs thousands of waits in one loop. A session and connection pool per
    wait measured about 34 KB per wait at 5,000 waits. With one shared, unbounded pool the
    cost is about 27 KB (the bare-SSE floor is 17 KB; see bench/RESULTS.md). The lateness
    seen when all 5,000 requests complete in the same second is not fixed by this: the floor
    shows it too. The session is reference-counted, so it closes with its last user, and
    tests and short-lived loops leave nothing open.
    """

    # Keyed by the loop itself, weakly: an entry dies with its loop, never reused by another.
    _sessions: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, int]]] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    async def acquire(cls) -> aiohttp.ClientSession:
        import aiohttp

        key = asyncio.get_running_loop()
        session, users = cls._sessions.get(key, (None, 0))
        if session is None or session.closed:
            # No per-host cap: every wait holds one open status stream to the same host.
            session, users = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0)), 0
        cls._sessions[key] = (session, users + 1)
        return session

    @classmethod
    async def release(cls) -> None:
        key = asyncio.get_running_loop()
        session, users = cls._sessions.get(key, (None, 0))
        if session is None:
            return
        if users <= 1:
            del cls._sessions[key]
            await session.close()
        else:
            cls._sessions[key] = (session, users - 1)


def _connect_failed(exc: BaseException) -> bool:
    """Whether a requests ConnectionError happened before anything was sent."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    text = repr(exc)
    return "NewConnectionError" in text or "NameResolutionError" in text or "Connection refused" in text


class ImageStream:
    """A forward-only image byte stream that counts, hashes and checks its length.

    ``read(n)`` returns exactly ``n`` bytes until the end (what s3transfer expects of a
    non-seekable upload source); transport failures become :class:`FluxTransportError`
    and a short body a :class:`FluxIntegrityError`, so a half-read image can never be
    mistaken for a whole one. It has no ``seek``, so uploads stream it in parts.
    """

    def __init__(self, raw: Any, *, url: str, content_length: int | None, content_type: str | None) -> None:
        self._raw = raw
        self.url = url
        self.content_length = content_length
        self.content_type = (content_type or "").split(";")[0].strip().lower() or None
        self.bytes_read = 0
        self._sha256 = hashlib.sha256()
        self._head = b""
        self._eof = False

    @classmethod
    def from_data_uri(cls, uri: str) -> ImageStream:
        import io

        header, _, payload = uri.partition(",")
        if not header.startswith("data:") or ";base64" not in header:
            raise FluxIntegrityError("Only base64 data: URIs are supported for inline images")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise FluxIntegrityError(f"Inline image is not valid base64: {exc}") from None
        return cls(io.BytesIO(data), url="data:", content_length=len(data), content_type=header[5:].split(";")[0])

    @property
    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def peek(self, n: int = 16) -> bytes:
        """The first ``n`` bytes (read ahead, still returned by ``read``): for magic checks."""
        if len(self._head) < n and self.bytes_read == 0:
            self._head += self._read_raw(n - len(self._head))
        return self._head[:n]

    def readable(self) -> bool:
        return True

    def _read_raw(self, n: int) -> bytes:
        import urllib3.exceptions
        from requests.exceptions import RequestException

        try:
            return self._raw.read(n) or b""
        except (OSError, urllib3.exceptions.HTTPError, RequestException) as exc:
            raise FluxTransportError(
                f"Image download broke after {self.bytes_read + len(self._head)} bytes: {type(exc).__name__}: {exc}"
            ) from exc

    def read(self, n: int = -1) -> bytes:
        if self._eof:
            return b""
        chunks: list[bytes] = []
        want = n if n >= 0 else 1 << 62
        if self._head:
            chunks.append(self._head[:want])
            self._head = self._head[want:]
            want -= len(chunks[0])
        while want > 0:
            data = self._read_raw(min(want, 1 << 20))
            if not data:
                self._eof = True
                break
            chunks.append(data)
            want -= len(data)
        out = b"".join(chunks)
        self.bytes_read += len(out)
        self._sha256.update(out)
        if self._eof and self.content_length is not None and self.bytes_read != self.content_length:
            raise FluxIntegrityError(
                f"Image download ended after {self.bytes_read} of {self.content_length} bytes: {self.url[:200]}"
            )
        return out
