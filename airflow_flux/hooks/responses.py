"""Reading the queue API's answers: JSON bodies, typed errors with the API's own reason, handles.

Shared by the sync and async transports, so a response means the same whichever path read
it. Error messages are built from status codes, bodies and URLs, never from request
headers: the token cannot end up in one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from airflow_flux.exceptions import (
    FluxAPIError,
    FluxAuthError,
    FluxResultExpiredError,
    FluxTransportError,
)
from airflow_flux.hooks.retry import RESUBMIT_SAFE_STATUS, RESULT_EXPIRED, is_retryable_status, parse_retry_after
from airflow_flux.models import FluxRequestHandle, FluxResult, FluxStatus
from airflow_flux.redact import redact_presigned, redact_value

if TYPE_CHECKING:
    from airflow_flux.hooks.settings import FluxConnectionSettings

MAX_DETAIL_CHARS = 1000


def parse_json(raw: bytes) -> Any:
    """The JSON of ``raw``, or None when it is empty or not JSON."""
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def check_response(
    status: int,
    headers: Mapping[str, str],
    raw: bytes,
    *,
    what: str,
    request_id: str | None,
    idempotent: bool,
) -> Any:
    """Return the JSON body of a successful response or raise the typed API error."""
    body = parse_json(raw)
    if 200 <= status < 300:
        if raw and body is None:
            raise FluxAPIError(
                f"{what}: the API answered HTTP {status} with a body that is not valid JSON",
                status_code=status,
                request_id=request_id,
                retryable=idempotent,
            )
        return body
    error = api_error(status, headers, body, raw, what=what, request_id=request_id)
    if not idempotent and status not in RESUBMIT_SAFE_STATUS:
        error.retryable = False  # not idempotent: never risk paying twice
    raise error


def _detail(body: Any, raw: bytes, error_type: str | None) -> tuple[str | None, str | None]:
    detail: str | None = None
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
        detail = raw[:MAX_DETAIL_CHARS].decode("utf-8", "replace")
    if detail and len(detail) > MAX_DETAIL_CHARS:
        detail = detail[:MAX_DETAIL_CHARS] + "..."
    return detail, error_type


def api_error(
    status: int,
    headers: Mapping[str, str],
    body: Any,
    raw: bytes,
    *,
    what: str,
    request_id: str | None,
) -> FluxAPIError:
    """The typed error of a non-2xx answer: status, fal's ``error_type`` and ``detail``, retryability.

    A signed URL the API echoes back (an input it could not fetch) is redacted first.
    """
    body = redact_value(body)
    raw = redact_presigned(raw.decode("utf-8", "replace")).encode() if raw and b"?" in raw else raw
    detail, error_type = _detail(body, raw, headers.get("X-Fal-Error-Type"))
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


def transport_error(what: str, exc: BaseException, request_id: str | None, retryable: bool) -> FluxTransportError:
    """A failure to reach the API; ``retryable`` says whether repeating the call is safe."""
    err = FluxTransportError(f"{what}: could not reach the API ({type(exc).__name__}: {exc})", request_id=request_id)
    err.retryable = retryable
    return err


def result_error(exc: FluxAPIError, handle: FluxRequestHandle) -> FluxAPIError:
    """A result call's error; a 404 for a request we hold the handle of means fal dropped it."""
    # fal keeps results for one hour after completion only.
    if exc.status_code == 404:
        return FluxResultExpiredError(
            f"The result of request {handle.request_id} is no longer available (HTTP 404): fal keeps "
            "results for 1 hour after completion (6 minutes for results of 10 KB or more). "
            "Fetch results as soon as requests complete.",
            status_code=404,
            detail=exc.detail,
            error_type=RESULT_EXPIRED,
            request_id=handle.request_id,
        )
    return exc


def parse_handle(
    body: Any, settings: FluxConnectionSettings, endpoint: str, flux_conn_id: str | None
) -> FluxRequestHandle:
    """The handle of a submit's answer, its URLs re-based when the connection says so."""
    if not isinstance(body, Mapping) or not body.get("request_id"):
        raise FluxAPIError(
            f"Submit to {endpoint}: the API's answer has no request_id: {str(body)[:MAX_DETAIL_CHARS]}",
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
    return FluxRequestHandle(request_id=request_id, endpoint=endpoint, flux_conn_id=flux_conn_id, **urls)


def parse_status(body: Any, h: FluxRequestHandle) -> FluxStatus:
    try:
        return FluxStatus.model_validate(body)
    except ValidationError:
        raise FluxAPIError(
            f"Status check: unexpected answer from the API: {str(body)[:MAX_DETAIL_CHARS]}",
            status_code=200,
            request_id=h.request_id,
            retryable=True,
        ) from None


#: What fal billed for a request, in the endpoint's billing unit (images, or megapixels).
BILLABLE_UNITS_HEADER = "X-Fal-Billable-Units"


def with_billable_units(body: Any, headers: Mapping[str, str]) -> Any:
    """A result's body with ``billable_units`` from fal's header, when it sends one (a number)."""
    raw = headers.get(BILLABLE_UNITS_HEADER)
    if raw is None or not isinstance(body, Mapping):
        return body
    try:
        units = float(raw)
    except ValueError:
        return body  # not a number: not ours to guess at
    return {**body, "billable_units": units}


def parse_result(body: Any, h: FluxRequestHandle) -> FluxResult:
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


def cancel_outcome(exc: FluxAPIError) -> str:
    """A cancel's answer: 400 ALREADY_COMPLETED / 404 NOT_FOUND are answers, not failures of the call."""
    if exc.status_code in (400, 404) and isinstance(exc.body, Mapping) and exc.body.get("status"):
        return str(exc.body["status"])
    raise exc
