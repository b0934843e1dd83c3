"""FluxBatchTrigger: waits on a whole batch of FLUX requests in one trigger.

fal runs an account's requests a few at a time (2 to 40) and queues the rest, so most of a
batch is ``IN_QUEUE`` most of the time. The trigger polls each pending request with a
bounded number of connections, less often the further back it is in the queue; a request
seen ``IN_PROGRESS`` gets a status stream (at most ``max_streams`` at once, about the
account's concurrency), so its completion is noticed at once; each result is fetched as
soon as its request completes (fal keeps it one hour). One event at the end:
:class:`~airflow_flux.events.FluxBatchEvent`, every request's outcome in a compact form
(what the copy to S3 needs, not the prompt the operator already has).

Like :class:`~airflow_flux.triggers.FluxStatusTrigger` it only reads, so a re-created
trigger (another triggerer, a restart) simply starts over on the same requests; its
deadline is wall-clock; on kill it cancels every request of the batch. Its row holds the
request ids once plus their common URL root, not a handle per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any, Literal

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_flux.events import BatchOutcome, FluxBatchEvent
from airflow_flux.exceptions import FluxAPIError, FluxError, FluxStreamsBusyError, FluxTransportError
from airflow_flux.hooks.flux import FluxHook
from airflow_flux.hooks.polling import next_poll_interval
from airflow_flux.hooks.retry import worth_resubmitting
from airflow_flux.hooks.shared import result_slots
from airflow_flux.models import FluxRequestHandle

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Mapping, Sequence

    from airflow_flux.models import FluxResult, FluxStatus


def pack_handles(handles: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, Any]:
    """The batch's handles as the trigger row keeps them: ids once, their URL root once.

    fal's URLs are ``{root}{id}``, ``{root}{id}/status`` and ``{root}{id}/cancel``; a handle
    that does not follow its batch's root is kept whole.
    """
    root = endpoint = None
    ids: list[list[Any]] = []
    others: list[list[Any]] = []
    for index, handle in handles:
        h = FluxRequestHandle.model_validate(dict(handle))
        if root is None:
            root, endpoint = h.response_url[: -len(h.request_id)], h.endpoint
        built = f"{root}{h.request_id}"
        if (h.response_url, h.status_url, h.cancel_url, h.endpoint) == (
            built,
            f"{built}/status",
            f"{built}/cancel",
            endpoint,
        ):
            ids.append([index, h.request_id])
        else:
            others.append([index, h.model_dump(exclude={"inputs"}, exclude_none=True)])
    return {"root": root, "endpoint": endpoint, "ids": ids, "others": others}


def unpack_handles(packed: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """``{index: handle}`` from :func:`pack_handles`' form."""
    handles: dict[int, dict[str, Any]] = {}
    root = packed.get("root") or ""
    for index, request_id in packed.get("ids", []):
        url = f"{root}{request_id}"
        handles[int(index)] = {
            "request_id": request_id,
            "response_url": url,
            "status_url": f"{url}/status",
            "cancel_url": f"{url}/cancel",
            "endpoint": packed.get("endpoint"),
        }
    for index, handle in packed.get("others", []):
        handles[int(index)] = dict(handle)
    return handles


def compact_result(result: FluxResult) -> dict[str, Any]:
    """What the copy needs of a result (and what the operator returns), without the prompt."""
    return result.model_dump(
        mode="json",
        include={"images", "seed", "has_nsfw_concepts", "timings", "request_id", "billable_units"},
        exclude_none=True,
    )


class FluxBatchTrigger(BaseTrigger):
    """Wait until every request of a batch has completed (or failed), fetching each result.

    :param flux_conn_id: the ``flux`` connection.
    :param requests: the batch's handles, packed by :func:`pack_handles`.
    :param end_time: wall-clock deadline (epoch seconds); what is unfinished then is
        reported ``pending`` (the operator cancels it).
    :param poll_interval: first polling interval of a request, seconds.
    :param max_poll_interval: cap of a request's polling interval, seconds.
    :param max_connections: status and result calls in flight at once.
    :param max_streams: status streams open at once (requests seen running); 0 polls only.
    :param max_consecutive_failures: transient failures in a row for one request before it
        is reported failed.
    :param progress_interval: seconds between progress lines in the task log.
    :param cancel_on_kill: cancel the batch's requests when a user kills the deferred task.
    :param started_at: when the wait began (epoch seconds).
    """

    def __init__(
        self,
        *,
        flux_conn_id: str,
        requests: dict[str, Any],
        end_time: float | None = None,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
        max_connections: int = 8,
        max_streams: int = 40,
        max_consecutive_failures: int = 5,
        progress_interval: float = 30.0,
        cancel_on_kill: bool = True,
        started_at: float | None = None,
    ) -> None:
        super().__init__()
        self.flux_conn_id = flux_conn_id
        self.requests = dict(requests)
        self.end_time = end_time
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.max_connections = max_connections
        self.max_streams = max_streams
        self.max_consecutive_failures = max_consecutive_failures
        self.progress_interval = progress_interval
        self.cancel_on_kill = cancel_on_kill
        self.started_at = started_at if started_at is not None else time.time()

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "flux_conn_id": self.flux_conn_id,
                "requests": self.requests,
                "end_time": self.end_time,
                "poll_interval": self.poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "max_connections": self.max_connections,
                "max_streams": self.max_streams,
                "max_consecutive_failures": self.max_consecutive_failures,
                "progress_interval": self.progress_interval,
                "cancel_on_kill": self.cancel_on_kill,
                "started_at": self.started_at,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        """Yield exactly one event, the batch's outcome. Reads only: safe to run again."""
        async with FluxHook(flux_conn_id=self.flux_conn_id) as hook:
            wait = BatchWait(
                hook,
                log=self.log,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                max_connections=self.max_connections,
                max_streams=self.max_streams,
                max_consecutive_failures=self.max_consecutive_failures,
            )
            for index, handle in unpack_handles(self.requests).items():
                wait.add(index, handle)
            last_progress = time.monotonic()

            def progress() -> None:
                nonlocal last_progress
                if time.monotonic() - last_progress >= self.progress_interval:
                    last_progress = time.monotonic()
                    self.log.info("FLUX batch: %s (%.0fs)", wait.counts(), time.time() - self.started_at)

            try:
                finished = await wait.until(
                    lambda: len(wait.outcomes) == len(wait.handles), end_time=self.end_time, tick=progress
                )
            finally:
                await wait.close()
        yield TriggerEvent(self._event(wait, "done" if finished else "timeout").payload())

    def _event(self, wait: BatchWait, status: Literal["done", "timeout"]) -> FluxBatchEvent:
        outcomes = [
            wait.outcomes.get(i) or BatchOutcome(index=i, request_id=wait.handles[i]["request_id"], status="pending")
            for i in sorted(wait.handles)
        ]
        counts = wait.counts()
        self.log.info("FLUX batch %s: %s", "finished" if status == "done" else status, counts)
        message = f"completed: {counts}" if status == "done" else f"did not complete within the timeout: {counts}"
        return FluxBatchEvent(
            status=status,
            message=f"FLUX batch of {len(wait.handles)} request(s) {message}",
            outcomes=outcomes,
            waited_seconds=round(time.time() - self.started_at, 3),
        )

    async def on_kill(self) -> None:
        """Cancel the batch's requests when a user kills the deferred task (Airflow 3.3+)."""
        if not self.cancel_on_kill:
            return
        handles = unpack_handles(self.requests)
        slots = asyncio.Semaphore(self.max_connections)

        async def cancel(hook: FluxHook, handle: dict[str, Any]) -> str:
            async with slots:
                try:
                    return await hook.acancel(handle)
                except FluxError as exc:
                    return f"not cancelled ({exc})"

        async with FluxHook(flux_conn_id=self.flux_conn_id) as hook:
            outcomes = await asyncio.gather(*(cancel(hook, h) for h in handles.values()))
        self.log.info("Cancel of the batch's %d FLUX request(s): %s", len(outcomes), sorted(set(outcomes)))


class BatchWait:
    """The wait on a set of FLUX requests that may grow while it runs.

    The trigger adds a whole batch and waits for all of it; the operator's window adds
    requests as it submits them and takes each outcome as soon as it is known
    (:meth:`take`), so what is kept is bounded by the window, not the batch.

    :param hook: the hook whose async client makes the calls.
    :param log: where stream failures are said.
    :param stream_queued: follow queued requests' streams too, not only running ones (a
        window, whose requests are few: each completion is then seen at once, and refilled).
    """

    def __init__(
        self,
        hook: FluxHook,
        *,
        log: Any,
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
        max_connections: int = 8,
        max_streams: int = 40,
        max_consecutive_failures: int = 5,
        stream_queued: bool = False,
    ) -> None:
        self.hook = hook
        self.stream_queued = stream_queued
        self.log = log
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.max_streams = max_streams
        self.max_consecutive_failures = max_consecutive_failures
        self.handles: dict[int, dict[str, Any]] = {}
        self.outcomes: dict[int, BatchOutcome] = {}
        self.added: dict[int, float] = {}  # index -> when it was added (monotonic)
        self.due: dict[int, float] = {}  # index -> next poll (monotonic)
        self.polls: dict[int, int] = {}
        self.failures: dict[int, int] = {}
        self.states: dict[int, str] = {}
        self.streams: dict[int, asyncio.Task[None]] = {}
        self.poll_only: set[int] = set()  # requests whose stream broke: polled from then on
        self.slots = asyncio.Semaphore(max_connections)
        self.streams_ok = max_streams > 0
        self.wake = asyncio.Event()

    def add(self, index: int, handle: Mapping[str, Any]) -> None:
        """Wait on ``handle`` as request ``index`` too (polled at once)."""
        now = time.monotonic()
        self.handles[index] = dict(handle)
        self.added[index], self.due[index], self.polls[index], self.failures[index] = now, 0.0, 0, 0
        self.wake.set()

    def take(self, index: int) -> BatchOutcome | None:
        """Forget request ``index`` (its outcome, if it has one, is returned)."""
        for table in (self.handles, self.added, self.due, self.polls, self.failures, self.states):
            table.pop(index, None)
        self.poll_only.discard(index)
        return self.outcomes.pop(index, None)

    @property
    def unfinished(self) -> list[int]:
        """The requests with no outcome yet, in index order."""
        return sorted(i for i in self.handles if i not in self.outcomes)

    async def until(self, done: Callable[[], bool], *, end_time: float | None, tick: Callable[[], None]) -> bool:
        """Poll and follow the requests until ``done()`` (True) or ``end_time`` passes (False).

        :param done: checked after every poll round and whenever :attr:`wake` is set.
        :param end_time: wall-clock deadline (epoch seconds), or None.
        :param tick: called once per round (progress lines).
        """
        while not done():
            remaining = None if end_time is None else end_time - time.time()
            if remaining is not None and remaining <= 0:
                return False
            now = time.monotonic()
            due = [i for i, at in self.due.items() if at <= now and i not in self.outcomes and i not in self.streams]
            if due:
                await asyncio.gather(*(self._poll(i) for i in due))
            tick()
            if done():
                break
            waits = [at for i, at in self.due.items() if i not in self.outcomes and i not in self.streams]
            delay = max(0.05, min(waits) - time.monotonic()) if waits else self.max_poll_interval
            if end_time is not None:
                delay = min(delay, max(0.0, end_time - time.time()))
            self.wake.clear()
            # A stream that ends (completion or fallback), or an added request, wakes the loop at once.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), delay)
        return True

    async def close(self) -> None:
        """Stop following every stream (their connections go back to the pool)."""
        tasks = list(self.streams.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one request ----------------------------------------------------------------------

    async def _poll(self, index: int) -> None:
        handle = self.handles[index]
        try:
            async with self.slots:
                status = await self.hook.aget_status(handle, logs=False)
        except FluxAPIError as exc:
            await self._call_failed(index, exc)
            return
        except FluxError as exc:  # untrusted URL, bad handle: nothing to wait for
            self.outcomes[index] = self._failed(index, str(exc), None, None, retryable=False)
            return
        self.failures[index] = 0
        self.states[index] = status.status
        if status.is_completed:
            await self._completed(index, status)
            return
        if (
            (status.status == "IN_PROGRESS" or self.stream_queued)
            and self.streams_ok
            and index not in self.poll_only
            and len(self.streams) < self.max_streams
        ):
            self.streams[index] = asyncio.ensure_future(self._follow(index))
            return
        self._schedule(index, status.queue_position if status.status == "IN_QUEUE" else None)

    def _schedule(self, index: int, queue_position: int | None) -> None:
        polls = self.polls[index] = self.polls[index] + 1
        interval = next_poll_interval(
            polls, time.monotonic() - self.added[index], initial=self.poll_interval, maximum=self.max_poll_interval
        )
        if queue_position:
            # Far back in the queue a request will not start soon: ask less often, but never
            # so rarely that its turn is missed (a position is often a few seconds).
            interval = max(interval, min(self.max_poll_interval, self.poll_interval * (1 + 0.25 * queue_position)))
        self.due[index] = time.monotonic() + interval

    async def _follow(self, index: int) -> None:
        """Follow a running request's stream until it completes; on any failure, poll it again."""
        busy = False
        try:
            # aclosing: the stream (a connection of the triggerer's bounded pool) is given
            # back when this ends, not when the generator is collected.
            final = None
            async with contextlib.aclosing(self.hook.astream_status(self.handles[index], logs=False)) as statuses:
                async for status in statuses:
                    self.states[index] = status.status
                    if status.is_completed:
                        final = status
                        break
            if final is not None:  # the stream closed first: the result fetch needs no second connection
                await self._completed(index, final)
        except FluxStreamsBusyError:
            busy = True  # the triggerer's share of streams is taken: poll on the usual schedule
        except FluxTransportError as exc:
            # Dropped, or an event over aiohttp's line limit: said, and this request is polled
            # from now on (a stream that broke once tends to break again).
            self.log.warning(
                "The status stream of %s broke (%s); polling it instead.", self.handles[index]["request_id"], exc
            )
            self.poll_only.add(index)
        except FluxAPIError as exc:
            if exc.status_code in (400, 404, 405, 406, 415, 501):
                self.streams_ok = False  # this server has no SSE: poll everything from now on
            else:
                self.log.warning(
                    "The status stream of %s failed (%s); polling it instead.", self.handles[index]["request_id"], exc
                )
        except FluxError as exc:
            self.log.warning(
                "The status stream of %s failed (%s); polling it instead.", self.handles[index]["request_id"], exc
            )
        except Exception:
            # Anything else would die with this task, unseen ("exception never retrieved").
            self.log.exception("The status stream of %s failed; polling it instead.", self.handles[index]["request_id"])
            self.poll_only.add(index)
        finally:
            self.streams.pop(index, None)
            if index not in self.outcomes:
                if busy:
                    self._schedule(index, None)
                else:
                    self.due[index] = time.monotonic()
            self.wake.set()

    async def _completed(self, index: int, status: FluxStatus) -> None:
        rid = self.handles[index]["request_id"]
        if status.is_failed:
            self.outcomes[index] = self._failed(
                index,
                status.error or "no reason given",
                status.error_type,
                200,
                retryable=worth_resubmitting(status_code=200, error_type=status.error_type),
            )
            return
        try:
            async with self.slots, result_slots():
                result = await self.hook.aget_result(self.handles[index])
        except FluxAPIError as exc:
            # fal reports most failures only here (422 content policy: final; 5xx: transient).
            retryable = worth_resubmitting(
                status_code=exc.status_code, error_type=exc.error_type, retryable=exc.retryable
            )
            self.outcomes[index] = self._failed(
                index, exc.detail or str(exc), exc.error_type, exc.status_code, retryable=retryable
            )
            return
        self.outcomes[index] = BatchOutcome(
            index=index,
            request_id=rid,
            status="completed",
            result=compact_result(result),
            waited_seconds=round(time.monotonic() - self.added[index], 3),
        )

    async def _call_failed(self, index: int, exc: FluxAPIError) -> None:
        if not exc.retryable:
            # 404: the API does not know the request (submitting it again is right); others
            # (401/403, a 4xx of an aggregator) say the same for any other request.
            retryable = worth_resubmitting(status_code=exc.status_code, error_type=exc.error_type)
            self.outcomes[index] = self._failed(index, str(exc), exc.error_type, exc.status_code, retryable=retryable)
            return
        self.failures[index] += 1
        if self.failures[index] >= self.max_consecutive_failures:
            # Out of touch, not failed: the request may well complete. Reported pending, so a
            # retry of the task waits for it again instead of paying for it twice.
            self.outcomes[index] = BatchOutcome(
                index=index, request_id=self.handles[index]["request_id"], status="pending", error=str(exc)
            )
            return
        backoff = min(self.max_poll_interval, self.poll_interval * 2 ** self.failures[index])
        self.due[index] = time.monotonic() + backoff

    def _failed(
        self, index: int, error: str, error_type: str | None, status_code: int | None, *, retryable: bool
    ) -> BatchOutcome:
        return BatchOutcome(
            index=index,
            request_id=self.handles[index]["request_id"],
            status="failed",
            error=error,
            error_type=error_type,
            status_code=status_code,
            retryable=retryable,
        )

    def counts(self) -> str:
        """``3 of 10 done, 1 failed, 2 running, 4 queued`` (of the requests it knows)."""
        done = [o for o in self.outcomes.values() if o.status == "completed"]
        failed = len(self.outcomes) - len(done)
        pending = [i for i in self.handles if i not in self.outcomes]
        running = sum(1 for i in pending if self.states.get(i) == "IN_PROGRESS")
        return (
            f"{len(done)} of {len(self.handles)} done, {failed} failed, {running} running, "
            f"{len(pending) - running} queued"
        )
