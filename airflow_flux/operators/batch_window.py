"""The batch window: at most ``max_in_flight`` requests submitted and unfinished, refilled as they finish.

Run by :class:`~airflow_flux.operators.FluxBatchGenerateOperator` in the worker for a batch
larger than its window. Why in the worker: submitting is paying, and a trigger may run
twice (a triggerer restart, two triggerers during a hand-over), so a trigger only reads; and
a deferral per window was measured (``bench/ANALYSIS.md``) to cost a resume per refill and to
meet Airflow's deferral race (apache/airflow#71580: a resumed attempt failed mid-window, its
records refused, paid again). Here the refill follows a finish by milliseconds, through the
same :class:`~airflow_flux.triggers.batch.BatchWait` the triggerer runs.

What survives the loss of the worker, bounded by the window, never by the batch:

* each submit's record (handle, fingerprint, try) in one of ``2 x max_in_flight``
  task state *slots*, written the moment the submit returns; a slot is reused once its
  request's line is in a checkpoint;
* every finished request's line in a *checkpoint*: a few hundred lines per S3 object next to
  the results file (or per task state value when the batch has no results bucket), each
  with the request's fingerprint and the task's ``max_tries``, so a later try keeps it only
  for the very request it would send (a clear starts afresh).

A later try keeps what is finished for good, awaits what its slots say is paid for and
unfinished, and submits the rest (a transient failure again). The results file (or list) is
composed at the end, in input order, through a temporary SQLite file on disk.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow_flux.exceptions import FluxError, FluxValidationError
from airflow_flux.identity import RequestIdentity, StoredRequest
from airflow_flux.metrics import request_finished
from airflow_flux.models import RequestOptions
from airflow_flux.operators.batch_items import (
    CHECKPOINT_FIELDS,
    PART_KEY,
    SLOT_KEY,
    WINDOW_KEY,
    LineStore,
    result_line,
    resume_window,
    window_lines,
)
from airflow_flux.operators.inputs import describe_inputs, has_s3_inputs
from airflow_flux.results import Tally
from airflow_flux.state import task_state

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_flux.events import BatchOutcome
    from airflow_flux.hooks.flux import FluxHook
    from airflow_flux.operators.batch_items import Checkpoints
    from airflow_flux.operators.inputs import InputResolver
    from airflow_flux.state import TaskState

#: Without ``results_s3_bucket``, a window of more requests is refused: its list would be XCom.
MAX_LISTED_RESULTS = 1000
#: Finished lines may wait this many seconds for their checkpoint.
CHECKPOINT_INTERVAL = 30.0
#: Submits in flight at once (each is one short HTTP call in a thread).
SUBMIT_CONCURRENCY = 8
#: Seconds between progress lines.
PROGRESS_INTERVAL = 10.0


class BatchWindow:
    """One try of a windowed batch (see the module's docstring).

    :param payload_of: request ``index``'s payload, validated (and its ``s3://`` inputs pinned).
    :param checkpoints: where finished lines go.
    :param end_time: wall-clock deadline of the whole batch (epoch seconds).
    """

    def __init__(
        self,
        *,
        hook: FluxHook,
        log: Any,
        store: TaskState | None,
        ti: Any,
        endpoint: str,
        count: int,
        payload_of: Callable[[int], dict[str, Any]],
        options: RequestOptions,
        resolver: InputResolver | None,
        checkpoints: Checkpoints,
        max_in_flight: int,
        end_time: float,
        flux_conn_id: str,
        reuse: bool,
        poll_interval: float,
        max_poll_interval: float,
        max_connections: int,
    ) -> None:
        self.hook, self.log, self.store = hook, log, store
        self.endpoint, self.count, self.payload_of = endpoint, count, payload_of
        self.options, self.resolver, self.checkpoints = options, resolver, checkpoints
        self.max_in_flight, self.end_time, self.flux_conn_id, self.reuse = max_in_flight, end_time, flux_conn_id, reuse
        self.poll_interval, self.max_poll_interval, self.max_connections = (
            poll_interval,
            max_poll_interval,
            max_connections,
        )
        self.max_tries = getattr(ti, "max_tries", None)
        self.try_number = getattr(ti, "try_number", None)
        self.price = hook.settings.prices
        self.base_url = hook.settings.base_url
        # The task's supervisor: Airflow's task runner has a process group of its own, so a
        # worker killed as a group (an OOM kill, a kill -9) leaves this process running on,
        # unsupervised, until its next call through the supervisor fails: a submit made then
        # would be paid for and never recorded. A new parent process means the supervisor died.
        self.parent = os.getppid()
        # Twice the window: when every slot is taken the finished lines are checkpointed first,
        # so the records in the task state never number more than this (plus the marker).
        self.slots = 2 * max_in_flight
        self.free: deque[int] = deque()
        self.slot_of: dict[int, int] = {}  # submitted, line not yet in a checkpoint: index -> slot
        self.done = bytearray(count)  # 1: its line is in a checkpoint (an earlier try's or this one's)
        self.buffer: list[dict[str, Any]] = []  # finished lines waiting for their checkpoint
        self.buffered_since = 0.0
        self.next_seq = 0
        self.unfinished: dict[int, dict[str, Any]] = {}  # handle and why, for requests left pending
        self.not_paid: dict[int, dict[str, Any]] = {}  # submits that failed: nothing was paid
        self.submit_error: tuple[int, BaseException] | None = None
        self.timed_out = False
        self.finished = self.failed = 0
        self.cost = 0.0
        self.last_progress = 0.0
        self.in_flight: dict[int, dict[str, Any]] = {}  # what on_kill cancels
        # Each in-flight request's payload and identity, built once (at its submit, or when a
        # resumed one is awaited) and let go with its line: bounded by the window.
        self.sent: dict[int, tuple[dict[str, Any], RequestIdentity]] = {}
        self.kept = LineStore()  # finished lines, by index, on disk

    # -- one request --------------------------------------------------------------------------

    def request(self, index: int) -> tuple[dict[str, Any], RequestIdentity]:
        """Request ``index``'s payload and identity, built from its item (no cache: a resume's)."""
        payload = self.payload_of(index)
        return payload, RequestIdentity.of(endpoint=self.endpoint, payload=payload, base_url=self.base_url)

    def fingerprint(self, index: int) -> str:
        return self.request(index)[1].fingerprint

    def _submit(
        self, index: int, sent: tuple[dict[str, Any], RequestIdentity]
    ) -> tuple[dict[str, Any], tuple[dict[str, Any], RequestIdentity]]:
        """Pay for request ``index`` (in a thread): its handle, and ``sent`` (its payload and
        identity, built in the loop's thread: the pinned payloads' SQLite file is that thread's)."""
        payload = sent[0]
        wire = self.resolver.resolve(payload) if self.resolver is not None and has_s3_inputs(payload) else payload
        handle = self.hook.submit(wire, endpoint=self.endpoint, options=self.options).model_dump()
        handle["inputs"] = describe_inputs(payload)  # the pinned s3:// URIs, never a presigned URL
        handle["index"] = index
        return handle, sent

    def _record(self, index: int, handle: dict[str, Any], identity: RequestIdentity) -> None:
        """The submit's record, in the request's slot (the task state is written from the loop's thread only)."""
        if self.store is None:
            return
        record = StoredRequest(handle=handle, identity=identity, max_tries=self.max_tries, try_number=self.try_number)
        self.store.set(SLOT_KEY.format(slot=self.slot_of[index]), record.model_dump(mode="json"))

    def _let_go(self, index: int) -> dict[str, Any]:
        """Request ``index`` is out of the window: its handle (its payload is not kept any longer)."""
        self.sent.pop(index, None)
        return self.in_flight.pop(index)

    def _finished(self, index: int, outcome: BatchOutcome) -> None:
        payload, identity = self.sent.get(index) or self.request(index)
        handle = self._let_go(index)
        line = result_line(
            index,
            payload,
            outcome.model_dump(mode="json", exclude_none=True),
            endpoint=self.endpoint,
            flux_conn_id=self.flux_conn_id,
            prices=self.price,
            inputs=handle.get("inputs"),
        )
        self.count_line(line)
        request_finished(line, waited_seconds=outcome.waited_seconds)
        line.update(fingerprint=identity.fingerprint, max_tries=self.max_tries, retryable=bool(outcome.retryable))
        if not self.buffer:
            self.buffered_since = time.monotonic()
        self.buffer.append(line)

    def count_line(self, line: Mapping[str, Any]) -> None:
        """Count a finished line in the progress (done or failed, and its cost)."""
        if line.get("status") == "completed":
            self.finished += 1
            self.cost += float(line.get("cost_usd") or 0)
        else:
            self.failed += 1

    # -- before the first submit ---------------------------------------------------------------

    def resume(self) -> dict[int, dict[str, Any]]:
        """What earlier tries left: lines kept (finished for good), and the handles to await again."""
        return resume_window(self)

    def keep_line(self, index: int, line: Mapping[str, Any]) -> None:
        """Keep a checkpointed line for the results (without its checkpoint-only fields)."""
        self.kept.keep(index, {k: v for k, v in line.items() if k not in CHECKPOINT_FIELDS})

    # -- the window -----------------------------------------------------------------------------

    def run(self) -> None:
        """Submit, wait and checkpoint until every request is finished, or the deadline passes;
        then :meth:`lines`, ``timed_out`` and ``submit_error`` say how it went."""
        awaited = self.resume()
        if self.store is not None:
            marker = self.store.get(WINDOW_KEY)
            previous = dict(marker) if isinstance(marker, Mapping) else {}
            slots = max(int(previous.get("slots") or 0), self.slots)
            self.store.set(WINDOW_KEY, {**previous, "requests": self.count, "slots": slots})
        else:
            self.log.warning("No task state store in this context: a retry of this batch pays for it again")
        asyncio.run(self._run(awaited))

    async def _run(self, awaited: dict[int, dict[str, Any]]) -> None:
        from airflow_flux.hooks.flux import FluxHook
        from airflow_flux.triggers.batch import BatchWait

        async with FluxHook(flux_conn_id=self.flux_conn_id) as ahook:
            wait = BatchWait(
                ahook,
                log=self.log,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                max_connections=self.max_connections,
                max_streams=max(1, self.max_in_flight),
                stream_queued=True,
            )
            for i, handle in awaited.items():
                self.in_flight[i] = handle
                wait.add(i, handle)
            todo = (i for i in range(self.count) if not self.done[i] and i not in awaited)
            submitting: dict[asyncio.Future[Any], int] = {}
            try:
                while True:
                    if os.getppid() != self.parent:
                        raise FluxError(
                            "FLUX batch: this task's supervisor process is gone (its worker was killed); no new "
                            "submit starts. A retry keeps what is checkpointed and awaits what the slots record"
                        )
                    while (
                        self.submit_error is None
                        and not self.timed_out
                        and len(wait.handles) + len(submitting) < self.max_in_flight
                        and len(submitting) < SUBMIT_CONCURRENCY
                        and self.free
                        and (nxt := next(todo, None)) is not None
                    ):
                        self.slot_of[nxt] = self.free.popleft()
                        submit: asyncio.Future[Any] = asyncio.ensure_future(
                            asyncio.to_thread(self._submit, nxt, self.request(nxt))
                        )
                        submit.add_done_callback(lambda _: wait.wake.set())
                        submitting[submit] = nxt
                    if not submitting and not wait.handles:
                        break
                    in_time = await wait.until(
                        lambda: bool(wait.outcomes) or any(f.done() for f in submitting),
                        end_time=self.end_time,
                        tick=lambda: self._progress(len(wait.handles) + len(submitting)),
                    )
                    for ended in [f for f in submitting if f.done()]:
                        self._submitted(wait, submitting.pop(ended), ended)
                    self._take_outcomes(wait)
                    if self.buffer and (
                        len(self.buffer) >= self.checkpoints.lines_per_part
                        or not self.free
                        or time.monotonic() - self.buffered_since >= CHECKPOINT_INTERVAL
                    ):
                        await self._checkpoint()
                    if not in_time:
                        self.timed_out = True
                        break
            finally:
                # Submits under way are paid for: awaited and recorded whatever ended the window.
                if submitting:
                    await asyncio.wait(list(submitting))
                for ended, index in submitting.items():
                    self._submitted(wait, index, ended)
                # No stream or poll from here on: what has no outcome now is left unfinished.
                await wait.close()
                self._take_outcomes(wait)
                left = wait.unfinished
                if self.timed_out:
                    await self._cancel(ahook, left)
                for index in left:
                    self.unfinished[index] = self._let_go(index)
            await self._checkpoint()
        self._progress(0, force=True)

    def _take_outcomes(self, wait: Any) -> None:
        for index in list(wait.outcomes):
            outcome = wait.take(index)
            if outcome is None:
                continue
            if outcome.status == "pending":  # out of touch: left for a retry, its slot kept
                self.unfinished[index] = {**self._let_go(index), "error": outcome.error}
            else:
                self._finished(index, outcome)

    def _submitted(self, wait: Any, index: int, future: asyncio.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self.free.append(self.slot_of.pop(index))
            self.not_paid[index] = {
                "status": "failed",
                "error": f"the submit failed: {exc}",
                "error_type": getattr(exc, "error_type", None),
                "status_code": getattr(exc, "status_code", None),
            }
            if self.submit_error is None:
                self.submit_error = (index, exc)
                self.log.warning(
                    "FLUX batch: requests[%d]: the submit failed (%s); no new submit starts, those in flight are "
                    "awaited and recorded",
                    index,
                    exc,
                )
            return
        handle, self.sent[index] = future.result()
        self._record(index, handle, self.sent[index][1])
        self.in_flight[index] = handle
        wait.add(index, handle)  # after the deadline too: then it is cancelled with the others

    async def _checkpoint(self) -> None:
        if not self.buffer:
            return
        lines, self.buffer = self.buffer, []
        if self.checkpoints.in_thread:  # an S3 PUT: the streams go on meanwhile
            await asyncio.to_thread(self.checkpoints.write, self.next_seq, lines)
        else:  # the task state: written from this thread only, as the slots are
            self.checkpoints.write(self.next_seq, lines)
        self.next_seq += 1
        for line in lines:
            index = line["index"]
            self.keep_line(index, line)
            self.done[index] = 1
            self.free.append(self.slot_of.pop(index))

    async def _cancel(self, hook: FluxHook, indices: list[int]) -> None:
        async def cancel(index: int) -> None:
            try:
                await hook.acancel(self.in_flight[index])
            except Exception as exc:
                self.log.warning("Could not cancel FLUX request %s: %s", self.in_flight[index]["request_id"], exc)

        if indices:
            self.log.info("FLUX batch: the deadline passed; cancelling the %d request(s) in flight", len(indices))
            await asyncio.gather(*(cancel(i) for i in indices))

    def cancel_in_flight(self) -> None:
        """Cancel what is in flight (``on_kill``): best effort, from the killing thread."""
        for handle in list(self.in_flight.values()):
            try:
                self.log.info("Cancel of FLUX request %s: %s", handle["request_id"], self.hook.cancel(handle))
            except Exception as exc:
                self.log.warning("Could not cancel FLUX request %s: %s", handle.get("request_id"), exc)

    def _progress(self, in_flight: int, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = time.monotonic()
        left = self.count - self.finished - self.failed - in_flight - len(self.unfinished)
        self.log.info(
            "FLUX batch: %d of %d done, %d failed, %d in flight, %d to submit; $%.4f so far",
            self.finished,
            self.count,
            self.failed,
            in_flight,
            max(0, left),
            self.cost,
        )

    # -- the end ----------------------------------------------------------------------------------

    def lines(self) -> Iterator[dict[str, Any]]:
        """Every request's line, in input order (after :meth:`run`)."""
        return window_lines(self)

    def state_keys(self) -> list[str]:
        """The task state keys this window wrote (deleted on success before Airflow 3.3)."""
        parts = [PART_KEY.format(seq=seq) for seq in range(self.next_seq)]
        return [WINDOW_KEY, *(SLOT_KEY.format(slot=slot) for slot in range(self.slots)), *parts]

    def close(self) -> None:
        self.kept.close()


def run_window(
    op: Any, context: Context, endpoint: str, items: Sequence[Any], max_in_flight: int
) -> list[dict[str, Any]] | dict[str, Any]:
    """Run the batch as a window in the worker (:mod:`~airflow_flux.operators.batch_window`)."""
    from airflow_flux.operators.batch_items import S3Checkpoints, StateCheckpoints
    from airflow_flux.operators.batch_submit import pin_each
    from airflow_flux.results import check_writable

    count = len(items)
    if not op.results_s3_bucket and count > MAX_LISTED_RESULTS:
        raise FluxValidationError(
            f"results_s3_bucket: a batch of {count} requests (more than {MAX_LISTED_RESULTS}) writes its results "
            "to S3 and returns a summary; give it results_s3_bucket. Nothing was submitted"
        )
    # Every item validated before any call, then let go: each payload is built again when it
    # is sent (once: the window keeps it while in flight), so memory holds the items only.
    images, needs_pinning = 0, False
    for index in range(count):
        payload = op._payload(items, index, endpoint)
        images += int(payload.get("num_images") or 1)
        needs_pinning = needs_pinning or has_s3_inputs(payload)
    op._check_images(count, images)
    options = RequestOptions.build(start_timeout=op.start_timeout, priority=op.priority)
    resolver = op._resolver(options) if needs_pinning else None
    pinned: LineStore | None = None
    if resolver is not None:  # every s3:// input checked, before any payment; pinned on disk
        pinned = LineStore()
        payloads = ((index, op._payload(items, index, endpoint)) for index in range(count))
        for index, payload in pin_each(resolver, payloads, log=op.log):
            pinned.keep(index, payload)

    def payload_of(index: int) -> dict[str, Any]:
        return pinned.get(index) if pinned is not None else op._payload(items, index, endpoint)

    store = task_state(context)
    place = None
    checkpoints: Any
    if op.results_s3_bucket:
        place = op._results_place(context)
        client, key, owner = place
        check_writable(client, str(op.results_s3_bucket), key, owner=owner)  # before any call
        checkpoints = S3Checkpoints(client, str(op.results_s3_bucket), key, owner)
    else:
        checkpoints = StateCheckpoints(store)
    op.log.info("FLUX batch: %d request(s), at most %d submitted and unfinished at once", count, max_in_flight)
    window = op._window = BatchWindow(
        hook=op.hook,
        log=op.log,
        store=store,
        ti=context.get("ti"),
        endpoint=endpoint,
        count=count,
        payload_of=payload_of,
        options=options,
        resolver=resolver,
        checkpoints=checkpoints,
        max_in_flight=max_in_flight,
        end_time=time.time() + float(op.wait_timeout),
        flux_conn_id=op.flux_conn_id,
        reuse=op.reuse_request,
        poll_interval=op.poll_interval,
        max_poll_interval=op.max_poll_interval,
        max_connections=op.max_connections,
    )
    try:
        window.run()
        failed: list[dict[str, Any]] = []
        tally = Tally(op.flux_lineage)

        def lines() -> Iterator[dict[str, Any]]:
            for line in window.lines():
                tally.add(line)
                if line["status"] == "failed" and len(failed) < 10:
                    failed.append(line)
                yield line

        # Written before a failure is raised: what was paid for is on record either way.
        if place is not None:
            result: list[dict[str, Any]] | dict[str, Any] = op._write_results(context, lines(), endpoint, place)
        else:
            result = list(lines())
    finally:
        window.close()
        if pinned is not None:
            pinned.close()
    op._log_totals(tally)
    if window.submit_error is not None:
        index, exc = window.submit_error
        raise FluxError(
            f"requests[{index}]: the submit failed: {exc}. Every request submitted is recorded (a retry does not "
            f"pay for it again); {tally.completed} completed, {tally.failed} failed or not submitted"
        ) from exc
    op._check_failures(tally, failed, timed_out=window.timed_out)
    return result
