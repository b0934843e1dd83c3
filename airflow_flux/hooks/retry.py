"""The one retry policy of every API call, sync and async, and the one answer to "pay again?".

Three questions, answered here and nowhere else:

- **Repeat a call?** (:class:`RetryPolicy`, built on tenacity so the sync and async paths
  share the same stop/wait/predicate objects.) Following fal's documented behaviour:
  transport failures and 408, 409, 429, 502, 503, 504 are transient; a 504 whose
  ``X-Fal-Request-Timeout-Type`` is ``user`` means the caller's own start deadline passed
  and is final; every other 4xx is final.
- **Pay for a failed request again?** (:func:`worth_resubmitting`, used by a single
  request's retry and by a batch alike.) Only when the failure was the infrastructure's:
  a transient ``error_type``, a 5xx that the call policy calls transient, or a request the
  API does not know (404). A final refusal (422 validation or content policy, which fal
  may bill; any other 4xx) is never paid for again by a retry; a user's clear still
  starts fresh.
- **Send a refused call again with other credentials?** (:func:`aresend_with_new_credentials`.)
  Once, after a 401/403, only when the connection read again holds other credentials: a
  token rotated while a wait ran.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import monotonic, time
from typing import TYPE_CHECKING, Any, TypeVar

import tenacity

from airflow_flux.exceptions import FluxAPIError, FluxAuthError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S")

#: fal ``error_type`` values of failed requests worth paying for again: the infrastructure's
#: failures, not the request's.
TRANSIENT_ERROR_TYPES: frozenset[str] = frozenset(
    {"runner_disconnected", "internal_error", "runner_unavailable", "bad_gateway"}
)

#: The ``error_type`` of a result fal no longer keeps (one hour after completion): the image
#: was paid for, so it is not paid for again (results are kept by whoever fetched them).
RESULT_EXPIRED = "result_expired"

RETRYABLE_STATUS: frozenset[int] = frozenset({408, 409, 429, 502, 503, 504})
#: Answers that mean the request was not taken: the only ones after which a submit (which
#: pays for an image) is sent again. A 502/504 from a gateway may come after fal queued it.
RESUBMIT_SAFE_STATUS: frozenset[int] = frozenset({408, 429, 503})


def is_retryable_status(status: int, headers: Mapping[str, str]) -> bool:
    """Whether a response with this status (and headers) is worth another attempt."""
    if status == 504 and headers.get("X-Fal-Request-Timeout-Type", "").lower() == "user":
        return False
    return status in RETRYABLE_STATUS


def worth_resubmitting(*, status_code: int | None, error_type: str | None, retryable: bool = False) -> bool:
    """Whether a request that ended in this failure may be paid for again (transient) or not (final).

    :param status_code: 200 for a ``COMPLETED`` status that carries an error; otherwise the
        HTTP status of the failed status or result call (0 for a transport failure).
    :param error_type: fal's ``error_type`` (body or ``X-Fal-Error-Type``).
    :param retryable: whether the call policy called that HTTP failure transient.
    """
    if error_type in TRANSIENT_ERROR_TYPES:
        return True
    if status_code == 404 and error_type != RESULT_EXPIRED:
        # The API does not know the request (lost, or never queued): nothing of it will
        # ever complete, so submitting it again is the only way to an image.
        return True
    return bool(status_code and status_code >= 500 and retryable)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or HTTP date), or None when absent/garbled."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time())
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter, honouring ``Retry-After``.

    :param max_attempts: attempts in all, the first included.
    :param initial_wait: first backoff, doubled each attempt (before jitter).
    :param max_wait: cap of one backoff.
    :param max_total: no new attempt starts when it would begin later than this many
        seconds after the first one.
    :param max_retry_after: cap on a server's ``Retry-After`` so a bad header cannot park a task.
    """

    max_attempts: int = 5
    initial_wait: float = 0.5
    max_wait: float = 20.0
    max_total: float = 120.0
    max_retry_after: float = 60.0

    def should_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, FluxAPIError) and exc.retryable

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, FluxAPIError) and exc.retry_after is not None:
            # The server said when to come back: do exactly that (capped), no earlier.
            return min(exc.retry_after, self.max_retry_after)
        backoff = tenacity.wait_exponential_jitter(
            multiplier=self.initial_wait, max=self.max_wait, jitter=self.initial_wait
        )
        return float(backoff(state))

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "FLUX API call failed (%s); retrying in %.1fs (attempt %d of %d)",
            exc,
            wait,
            state.attempt_number + 1,
            self.max_attempts,
        )

    def _kwargs(self, spent: float = 0.0) -> dict[str, Any]:
        return {
            "retry": tenacity.retry_if_exception(self.should_retry),
            "wait": self._wait,
            "stop": tenacity.stop_after_attempt(self.max_attempts)
            | tenacity.stop_before_delay(max(0.0, self.max_total - spent)),
            "before_sleep": self._log_retry,
            "reraise": True,
        }

    def retrying(self, *, spent: float = 0.0) -> tenacity.Retrying:
        """A tenacity controller for blocking calls.

        :param spent: seconds already used by earlier attempts, deducted from ``max_total``.
        """
        return tenacity.Retrying(**self._kwargs(spent))

    def aretrying(self, *, spent: float = 0.0) -> tenacity.AsyncRetrying:
        """The same policy for coroutines (sleeps with asyncio, never blocks the loop)."""
        return tenacity.AsyncRetrying(**self._kwargs(spent))

    # Nearly every call succeeds at once. The first attempt is therefore a plain call and a
    # tenacity controller is only built after a retryable failure, which it is handed as its
    # own first attempt, so counting, waits and logging stay tenacity's. A controller around
    # every call cost memory per waiting trigger and a share of the polling fallback's CPU
    # (bench/ANALYSIS.md, trigger scale).

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` under this policy (blocking)."""
        start = monotonic()
        try:
            return fn()
        except Exception as exc:
            if not self.should_retry(exc):
                raise
            first: Exception = exc
        replayed = False

        def again() -> T:
            nonlocal replayed
            if not replayed:
                replayed = True
                raise first
            return fn()

        return self.retrying(spent=monotonic() - start)(again)

    async def acall(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run the coroutine function ``fn`` under this policy."""
        start = monotonic()
        try:
            return await fn()
        except Exception as exc:
            if not self.should_retry(exc):
                raise
            first: Exception = exc
        replayed = False

        async def again() -> T:
            nonlocal replayed
            if not replayed:
                replayed = True
                raise first
            return await fn()

        return await self.aretrying(spent=monotonic() - start)(again)


#: The policy every hook uses unless given its own: one object per process, not per hook.
DEFAULT_RETRY_POLICY = RetryPolicy()


async def aresend_with_new_credentials(
    send: Callable[[S], Awaitable[T]], settings: S, reread: Callable[[S], Awaitable[S | None]]
) -> T:
    """``send(settings)``; after a 401/403, once more with ``reread(settings)`` unless that is None.

    :param send: the call (under its own :class:`RetryPolicy`) made with the given settings.
    :param settings: the connection's settings as kept.
    :param reread: the connection read again; None when its credentials did not change, so a
        token that is simply wrong is not sent twice.
    """
    try:
        return await send(settings)
    except FluxAuthError:
        fresh = await reread(settings)
        if fresh is None:
            raise
    return await send(fresh)
