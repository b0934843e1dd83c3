"""Each call of the queue API, described once: method, URL, idempotency, how its answer is read.

The hook's sync (requests) and async (aiohttp) methods are both built from these
descriptions (:meth:`FluxHook._run` and :meth:`FluxHook._arun`), so the twins cannot drift:
they differ only in the transport that sends an :class:`ApiCall`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import ValidationError

from airflow_flux.exceptions import FluxAPIError, FluxError
from airflow_flux.hooks.responses import (
    cancel_outcome,
    check_response,
    parse_handle,
    parse_result,
    parse_status,
    result_error,
    with_billable_units,
)
from airflow_flux.models import FluxRequestHandle, FluxResult, FluxStatus, RequestOptions, build_payload

if TYPE_CHECKING:
    from pydantic import BaseModel

    from airflow_flux.hooks.settings import FluxConnectionSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
HandleLike = FluxRequestHandle | Mapping[str, Any] | str
#: A request id that cannot exist: its status call tells an accepted token from a refused one.
PROBE_REQUEST_ID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class ApiCall(Generic[T]):
    """One call: what to send, and how to read what comes back.

    :param method: HTTP method.
    :param url: the URL as the API gave it (the transport re-bases or refuses it).
    :param what: what the call does, for messages ("Status check").
    :param parse: the answer's JSON body to the call's result.
    :param request_id: the request the call is about, for messages.
    :param json_body: the JSON body to send.
    :param params: query parameters.
    :param idempotent: whether sending it twice is harmless (a submit is not: it pays).
    :param on_error: turns an API error into the call's result, or into a better error.
    :param headers: headers beyond the connection's own (a submit's fal options).
    """

    method: str
    url: str
    what: str
    parse: Callable[[Any], T]
    request_id: str | None = None
    json_body: Any = None
    params: Mapping[str, str] | None = None
    idempotent: bool = True
    on_error: Callable[[FluxAPIError], T] | None = None
    headers: Mapping[str, str] | None = None
    #: Whether the answer carries what the request was billed (``X-Fal-Billable-Units``).
    billed: bool = False

    def answer(self, status: int, headers: Mapping[str, str], raw: bytes) -> Any:
        """The JSON body of a successful answer to this call, or the typed API error raised."""
        body = check_response(
            status, headers, raw, what=self.what, request_id=self.request_id, idempotent=self.idempotent
        )
        return with_billable_units(body, headers) if self.billed else body


def handle_from(handle: HandleLike, settings: FluxConnectionSettings, flux_conn_id: str) -> FluxRequestHandle:
    """A full handle from a handle, a dict or a bare request id (URLs built on the connection)."""
    if isinstance(handle, FluxRequestHandle):
        return handle
    if isinstance(handle, str):
        return FluxRequestHandle.for_request_id(
            handle, base_url=settings.base_url, endpoint=settings.endpoint, flux_conn_id=flux_conn_id
        )
    data = dict(handle)
    if not data.get("status_url") and data.get("request_id"):
        # A bare id: its URLs are built on this connection, so the handle is this connection's.
        endpoint = data.get("endpoint") or settings.endpoint
        return FluxRequestHandle.for_request_id(
            str(data["request_id"]), base_url=settings.base_url, endpoint=endpoint, flux_conn_id=flux_conn_id
        )
    try:
        return FluxRequestHandle.model_validate(data)
    except ValidationError as exc:
        raise FluxError(
            f"Not a FLUX request handle (needs request_id and its URLs): {exc.errors(include_url=False)}"
        ) from None


def submit_call(
    settings: FluxConnectionSettings,
    flux_conn_id: str,
    request: BaseModel | Mapping[str, Any],
    *,
    endpoint: str | None,
    webhook_url: str | None,
    options: RequestOptions | None = None,
) -> ApiCall[FluxRequestHandle]:
    """Queue a request (validated first: :class:`FluxValidationError` before any call)."""
    path = (endpoint or settings.endpoint).strip("/")
    payload = build_payload(request, path)
    headers = {**settings.submit_headers, **(options.headers() if options else {})}

    def parse(body: Any) -> FluxRequestHandle:
        handle = parse_handle(body, settings, path, flux_conn_id)
        log.info("Submitted FLUX request %s to %s", handle.request_id, path)
        return handle

    return ApiCall(
        "POST",
        f"{settings.base_url}/{path}",
        f"Submit to {path}",
        parse,
        json_body=payload,
        params={"fal_webhook": webhook_url} if webhook_url else None,
        # Not idempotent: a resend after an ambiguous failure could pay for two images.
        idempotent=False,
        headers=headers or None,
    )


def status_call(h: FluxRequestHandle, *, logs: bool) -> ApiCall[FluxStatus]:
    return ApiCall(
        "GET",
        h.status_url,
        "Status check",
        lambda body: parse_status(body, h),
        request_id=h.request_id,
        params={"logs": "1" if logs else "0"},
    )


def result_call(h: FluxRequestHandle) -> ApiCall[FluxResult]:
    def on_error(exc: FluxAPIError) -> FluxResult:
        raise result_error(exc, h) from None

    return ApiCall(
        "GET",
        h.response_url,
        "Fetching the result",
        lambda body: parse_result(body, h),
        request_id=h.request_id,
        on_error=on_error,
        billed=True,
    )


def cancel_call(h: FluxRequestHandle) -> ApiCall[str]:
    return ApiCall(
        "PUT",
        h.cancel_url,
        "Cancel",
        lambda body: str((body or {}).get("status", "CANCELLATION_REQUESTED")),
        request_id=h.request_id,
        on_error=cancel_outcome,
    )


def probe_call(settings: FluxConnectionSettings) -> ApiCall[None]:
    """The connection test: an authenticated status call for a request that cannot exist."""
    probe = FluxRequestHandle.for_request_id(PROBE_REQUEST_ID, base_url=settings.base_url, endpoint=settings.endpoint)
    return ApiCall("GET", probe.status_url, "Connection test", lambda body: None)
