"""FluxStatusTrigger: waits for a fal queue request in the triggerer, not in a worker slot."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any, TypeVar

# aiohttp and the hook are imported with the trigger class, when the triggerer loads it,
# not lazily on the first await: a first import inside run() blocked the triggerer's event
# loop for ~0.5 s (seen under a real triggerer).
import aiohttp  # noqa: F401
from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_flux.events import FluxWaitEvent, WaitStatus
from airflow_flux.exceptions import FluxAPIError, FluxError, FluxStreamsBusyError, FluxTransportError
from airflow_flux.hooks.flux import FluxHook
from airflow_flux.hooks.polling import next_poll_interval
from airflow_flux.hooks.shared import result_slots
from airflow_flux.models import FluxRequestHandle, FluxStatus

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine

T = TypeVar("T")

#: Stream refusals that mean "this server has no SSE here": fall back to polling for good.
_STREAM_UNSUPPORTED = frozenset({400, 404, 405, 406, 415, 501})


async def _within(coro: Coroutine[Any, Any, T], seconds: float | None) -> T:
    """``await coro``, raising :class:`asyncio.TimeoutError` after ``seconds`` (None: no limit).

    ``asyncio.wait_for`` wraps the coroutine in a new task before 3.12; a task per wait is
    memory that thousands of waits in one triggerer each hold, where a timeout scope is not.
    """
    if seconds is None:
        return await coro
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)  # pragma: no cover - Python 3.10


class _Progress:
    """Turns a stream of statuses into a few readable log lines (no flooding)."""

    def __init__(self, trigger: FluxStatusTrigger) -> None:
        self.trigger = trigger
        self.status: str | None = None
        self.queue_position: int | None = None
        self.logs_seen = 0
        self.last_line = time.monotonic()

    def update(self, status: FluxStatus) -> None:
        log = self.trigger.log
        rid = self.trigger.handle["request_id"]
        if status.status != self.status:
            where = f" (position {status.queue_position})" if status.queue_position is not None else ""
            log.info("FLUX request %s is %s%s", rid, status.status, where)
            self.status, self.queue_position = status.status, status.queue_position
            self.last_line = time.monotonic()
        elif status.queue_position != self.queue_position and status.queue_position is not None:
            self.queue_position = status.queue_position
            log.info("FLUX request %s: queue position %s", rid, status.queue_position)
            self.last_line = time.monotonic()
        logs = status.logs or []
        # Each status repeats the whole log so far: print only what is new.
        for entry in logs[self.logs_seen :]:
            if entry.message:
                log.info("FLUX request %s | %s", rid, entry.message)
        self.logs_seen = max(self.logs_seen, len(logs))

    def heartbeat(self, started: float) -> None:
        if time.monotonic() - self.last_line >= 60:
            self.trigger.log.info(
                "Still waiting for FLUX request %s (%s, %.0fs so far)",
                self.trigger.handle["request_id"],
                self.status or "unknown",
                time.time() - started,
            )
            self.last_line = time.monotonic()


class FluxStatusTrigger(BaseTrigger):
    """Wait until a fal queue request completes, then fetch its result at once.

    Follows the request's Server-Sent-Events stream when the API offers it (one call for
    the whole wait); otherwise polls with an interval that grows with the wait. Yields one
    event: ``success`` (with the result: fal keeps it for one hour only, so it is fetched
    right away), ``failed`` (the API's reason and ``error_type``), ``timeout`` or ``error``:
    a :class:`~airflow_flux.events.FluxWaitEvent`, which ``execute_complete`` reads back.

    Only the connection id, the request's handle and settings are serialized: the token is
    looked up in :meth:`run` and never stored in the trigger row.

    :param flux_conn_id: the ``flux`` connection.
    :param handle: the request handle (``request_id``, ``status_url``, ``response_url``, ``cancel_url``).
    :param end_time: wall-clock deadline (epoch seconds); survives re-creation of the trigger
        in another triggerer, unlike a monotonic clock.
    :param use_stream: try the SSE stream first.
    :param poll_interval: first polling interval in seconds (polling fallback).
    :param max_poll_interval: cap of the polling interval.
    :param max_consecutive_failures: transient failures in a row tolerated before giving up.
    :param fetch_result: fetch the result JSON once the request completes.
    :param cancel_on_kill: cancel the remote request when a user kills the deferred task.
    :param started_at: when the wait began (epoch seconds), for progress lines and intervals.
    :param api_logs: ask the API for its log lines with each status and print them in the
        task log. False makes every status event smaller: at 5,000 waits in one triggerer,
        less CPU per wait and while waiting (bench/ANALYSIS.md).
    """

    def __init__(
        self,
        *,
        flux_conn_id: str,
        handle: dict[str, Any],
        end_time: float | None = None,
        use_stream: bool = True,
        poll_interval: float = 1.0,
        max_poll_interval: float = 30.0,
        max_consecutive_failures: int = 5,
        fetch_result: bool = True,
        cancel_on_kill: bool = True,
        started_at: float | None = None,
        api_logs: bool = True,
    ) -> None:
        super().__init__()
        self.flux_conn_id = flux_conn_id
        # Normalised through the model so only the handle's known, secret-free fields travel.
        self.handle = FluxRequestHandle.model_validate(handle).model_dump()
        self.end_time = end_time
        self.use_stream = use_stream
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.max_consecutive_failures = max_consecutive_failures
        self.fetch_result = fetch_result
        self.cancel_on_kill = cancel_on_kill
        self.started_at = started_at if started_at is not None else time.time()
        self.api_logs = api_logs

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "flux_conn_id": self.flux_conn_id,
                "handle": self.handle,
                "end_time": self.end_time,
                "use_stream": self.use_stream,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "max_consecutive_failures": self.max_consecutive_failures,
                "fetch_result": self.fetch_result,
                "cancel_on_kill": self.cancel_on_kill,
                "started_at": self.started_at,
                "api_logs": self.api_logs,
            },
        )

    def _hook(self) -> FluxHook:
        return FluxHook(flux_conn_id=self.flux_conn_id)

    def _remaining(self) -> float | None:
        return None if self.end_time is None else self.end_time - time.time()

    def _event(self, status: WaitStatus, message: str, **extra: Any) -> TriggerEvent:
        event = FluxWaitEvent.of(
            status=status,
            message=message,
            request_id=self.handle["request_id"],
            handle=self.handle,
            waited_seconds=round(time.time() - self.started_at, 3),
            **extra,
        )
        return TriggerEvent(event.payload())

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Yield exactly one terminal event. Reads only: safe to run again after a restart."""
        async with self._hook() as hook:
            yield await self._wait(hook)

    async def _wait(self, hook: FluxHook) -> TriggerEvent:
        rid = self.handle["request_id"]
        progress = _Progress(self)
        failures = 0
        polls = 0
        stream = self.use_stream
        final: FluxStatus | None = None
        status: FluxStatus | None = None
        while True:
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                return self._event(
                    "timeout",
                    f"FLUX request {rid} did not complete within the timeout "
                    f"(waited {time.time() - self.started_at:.0f}s, last status {progress.status or 'unknown'}).",
                )
            streaming = stream
            try:
                if streaming:
                    try:
                        final = await _within(self._follow_stream(hook, progress), remaining)
                    except FluxStreamsBusyError:
                        # The triggerer's share of streams is taken: poll this time, and try the
                        # stream again at the next check (it stays the cheaper way to wait).
                        streaming = False
                if not streaming:
                    status = await _within(hook.aget_status(self.handle, logs=self.api_logs), remaining)
                    progress.update(status)
                    final = status if status.is_completed else None
                failures = 0
                if final is not None:
                    if final.is_failed:
                        return self._failed_event(final)
                    metrics = final.metrics or {}
                    # The status (and its log lines) is not needed while the result downloads,
                    # and when thousands of requests complete together, thousands of result
                    # calls are in flight at once.
                    final = status = None
                    return await self._finish(hook, metrics)
            except asyncio.TimeoutError:
                continue  # the deadline check above turns this into a timeout event
            except FluxAPIError as exc:
                if streaming and exc.status_code in _STREAM_UNSUPPORTED:
                    self.log.info("The status stream is not available here (%s); polling instead.", exc)
                    stream = False
                    continue
                if streaming and isinstance(exc, FluxTransportError):
                    # A dropped stream, or an event over aiohttp's line limit: check once by
                    # polling, then keep polling (proxies that cut streams tend to do it again,
                    # and a long log stays long).
                    self.log.warning("The status stream of %s broke (%s); polling instead.", rid, exc)
                    stream = False
                    continue
                if not exc.retryable:
                    return self._event(
                        "error", str(exc), status_code=exc.status_code, error_type=exc.error_type, detail=exc.detail
                    )
                failures += 1
                if failures >= self.max_consecutive_failures:
                    return self._event(
                        "error",
                        f"Giving up on FLUX request {rid} after {failures} failed status checks in a row: {exc}",
                        status_code=exc.status_code,
                        error_type=exc.error_type,
                        detail=exc.detail,
                    )
                self.log.warning("Status check of %s failed (%s); will try again.", rid, exc)
            except FluxError as exc:  # untrusted URL, bad handle: nothing to wait for
                return self._event("error", str(exc))

            progress.heartbeat(self.started_at)
            delay = next_poll_interval(
                polls,
                time.time() - self.started_at,
                initial=self.poll_interval,
                maximum=self.max_poll_interval,
                queue_position=progress.queue_position if progress.status == "IN_QUEUE" else None,
            )
            if failures:  # back off after failed checks, beyond the normal schedule
                delay = max(delay, min(self.max_poll_interval, self.poll_interval * 2**failures))
            polls += 1
            remaining = self._remaining()
            await asyncio.sleep(delay if remaining is None else max(0.0, min(delay, remaining)))

    async def _follow_stream(self, hook: FluxHook, progress: _Progress) -> FluxStatus | None:
        # aclosing: the stream (and its share of the triggerer's connections) is given back
        # as soon as the wait leaves it, not when the generator is collected.
        async with contextlib.aclosing(hook.astream_status(self.handle, logs=self.api_logs)) as statuses:
            async for status in statuses:
                progress.update(status)
                if status.is_completed:
                    return status
                del status  # not kept alive while waiting for the next event (see the hook)
        return None

    def _failed_event(self, final: FluxStatus) -> TriggerEvent:
        return self._event(
            "failed",
            f"FLUX request {self.handle['request_id']} failed: "
            f"{final.error_type or 'error'}: {final.error or 'no reason given'}",
            error=final.error,
            error_type=final.error_type,
            metrics=final.metrics or {},
        )

    async def _finish(self, hook: FluxHook, metrics: dict[str, Any]) -> TriggerEvent:
        rid = self.handle["request_id"]
        if not self.fetch_result:
            return self._event("success", f"FLUX request {rid} completed.", metrics=metrics)
        try:
            async with result_slots():
                result = await hook.aget_result(self.handle)
        except FluxAPIError as exc:
            # fal reports most failures only here (e.g. 422 content policy): pass its reason on.
            return self._event(
                "failed",
                f"FLUX request {rid} completed but has no result: {exc}",
                error=exc.detail,
                error_type=exc.error_type,
                status_code=exc.status_code,
                metrics=metrics,
            )
        self.log.info("FLUX request %s completed with %d image(s).", rid, len(result.images))
        return self._event(
            "success",
            f"FLUX request {rid} completed.",
            # The fields the worker adds later (endpoint, inputs, cost) are not sent from here.
            result=result.model_dump(mode="json", exclude={"endpoint", "inputs", "cost_usd"}),
            metrics=metrics,
        )

    async def on_kill(self) -> None:
        """Cancel the remote request when a user kills the deferred task (Airflow 3.3+)."""
        if not self.cancel_on_kill:
            return
        try:
            async with self._hook() as hook:
                outcome = await hook.acancel(self.handle)
            self.log.info("Cancelled FLUX request %s: %s", self.handle["request_id"], outcome)
        except Exception as exc:
            self.log.warning("Could not cancel FLUX request %s: %s", self.handle["request_id"], exc)
