"""Typed errors raised by the provider.

Every error that comes from the API carries the HTTP status, fal's ``error_type`` and the
API's own ``detail`` so a task's failure message says *why* the remote side refused.
No error message ever contains the API token: messages are built from status codes,
response bodies and URLs, never from request headers.
"""

from __future__ import annotations

from typing import Any

#: The codes S3 (and S3-compatible stores) answer for an object that is not there.
S3_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def s3_not_found(exc: Exception) -> bool:
    """Whether ``exc`` (a botocore ``ClientError``) says the object is not there."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) in S3_NOT_FOUND_CODES


class FluxError(Exception):
    """Base class of every error raised by airflow-flux."""


class FluxValidationError(FluxError, ValueError):
    """A request failed validation before any call was made (nothing was paid for)."""

    def __init__(self, message: str, *, errors: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        #: ``(field, message)`` pairs, one per invalid field.
        self.errors: list[tuple[str, str]] = errors or []


class FluxConfigError(FluxError):
    """The ``flux`` connection is misconfigured (bad base URL, unknown auth scheme, ...)."""


class FluxUntrustedURLError(FluxError):
    """A URL points at a host that may not receive the API token.

    Raised instead of calling the URL, so the token never leaves the configured API hosts.
    """


class FluxAPIError(FluxError):
    """The API answered with an error status.

    :param status_code: HTTP status of the response (0 for a transport failure).
    :param detail: the API's ``detail``; a 422 list is rendered as ``field: message``.
    :param error_type: fal's ``error_type`` (body or ``X-Fal-Error-Type`` header).
    :param request_id: the fal request id the call was about, when known.
    :param retryable: whether the retry policy considers this failure transient.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        detail: str | None = None,
        error_type: str | None = None,
        request_id: str | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail
        self.error_type = error_type
        self.request_id = request_id
        self.retryable = retryable
        self.retry_after = retry_after
        self.body = body


class FluxTransportError(FluxAPIError):
    """The API could not be reached (connection refused/reset, timeout, broken stream)."""

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message, status_code=0, request_id=request_id, retryable=True)


class FluxStreamsBusyError(FluxError):
    """Every status stream this event loop may hold is open: poll this time, try the stream later."""


class FluxAuthError(FluxAPIError):
    """The API refused the token (401/403)."""


class FluxResultExpiredError(FluxAPIError):
    """The result is gone: fal keeps a completed request's result for one hour only."""


class FluxRequestFailedError(FluxAPIError):
    """The request ended ``COMPLETED`` but failed (fal has no FAILED status)."""


class FluxTimeoutError(FluxError, TimeoutError):
    """A request did not complete within the wait's timeout (it was cancelled if so configured)."""


class FluxIntegrityError(FluxError):
    """An image's bytes are not what the result promised (short body, wrong type, bad data URI)."""


class FluxImageExistsError(FluxError, FileExistsError):
    """A destination key of a copy to S3 exists and ``replace`` is off; nothing was written."""


class FluxImageHostRefusedError(FluxError):
    """An image URL (or a redirect) names a host the connection does not allow downloads from,
    or one that resolves to a private address; refused before anything is sent there."""


class FluxImageTooLargeError(FluxIntegrityError):
    """An image is larger than the connection's ``max_image_mib``; nothing of it is stored."""
