"""FluxBatchGenerateOperator: hundreds of FLUX requests in one task, at the API's own speed.

Every request is validated first and every ``s3://`` input checked and pinned to the
object it is now (one HEAD per distinct input), all before the first paid call. Then the
requests are submitted from the worker, a few at a time, each recorded in
``task_state_store`` (with its fingerprint) the moment its submit returns, in the order
submits complete. On the first submit that fails for good (the hook has already retried
transient answers) no new submit starts: those in flight are awaited and recorded, then
the task fails naming the item and the API's reason. The task defers
once, to one :class:`~airflow_flux.triggers.FluxBatchTrigger` for the whole batch, and
returns every request's outcome in input order. A retry pays only for what failed: a
completed request's result is kept in the task state (fal keeps it one hour, the copy may
come later), an unfinished one is awaited again, a transient failure is submitted again,
and a final refusal (422 validation or content policy, which fal may bill) stays failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from airflow_flux.exceptions import FluxError, FluxTimeoutError, FluxValidationError
from airflow_flux.identity import DEFAULT_CONN_ID, StoredRequest
from airflow_flux.links import FluxGalleryLink
from airflow_flux.models import RequestOptions, build_payload, cost_usd
from airflow_flux.operators.flux import REQUEST_FIELDS
from airflow_flux.operators.inputs import InputResolver, check_inputs, describe_inputs, has_s3_inputs
from airflow_flux.operators.wait import DEFAULT_WAIT_TIMEOUT, default_deferrable
from airflow_flux.state import task_state, with_state_cleanup

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_flux.hooks.flux import FluxHook
    from airflow_flux.operators.reuse import RequestReuse

#: A batch that would generate more images than this is refused before any submit, unless
#: ``max_images`` says otherwise: a templated list that grew by mistake must not be paid for.
DEFAULT_MAX_IMAGES = 500
#: ``task_state_store`` keys: request ``index``'s record (handle and fingerprint, written the
#: moment it is paid for), the batch's marker (written before its first submit: without it,
#: no try has paid for anything, and no record need be read), and every finished request's
#: outcome, compact results included (one value, written when the wait ends).
STATE_KEY = "flux_batch/{index}"
MARKER_KEY = "flux_batch"
OUTCOMES_KEY = "flux_batch/outcomes"
#: Submits in flight at once from the worker (each is one short HTTP call).
SUBMIT_CONCURRENCY = 8
#: Seconds between progress lines while submitting.
PROGRESS_INTERVAL = 10.0


class FluxBatchGenerateOperator(BaseOperator):
    """Generate a batch of FLUX.1 Kontext images in one task: submit all, wait once, return all.

    Returns a list in input order: each item the single result's fields (``images``,
    ``seed``, ``has_nsfw_concepts``, ``timings``, ``request_id``, ``prompt``, ``endpoint``,
    ``inputs``, ``cost_usd``) plus ``index`` and ``status`` (``completed``), or ``index``,
    ``status`` (``failed``) and the API's ``error``, ``error_type`` and ``status_code``.
    With ``results_s3_bucket`` the items go to a JSON Lines file there instead and the task
    returns a small summary (:class:`~airflow_flux.results.BatchResultsSummary`: counts, cost,
    ``results_uri``), whatever the batch's size. :class:`~airflow_flux.transfers.FluxToS3Operator`
    takes either as its ``source``.

    :param requests: the batch (templated; an XComArg too): prompt strings, or dicts of
        request fields (an item's own fields win over the shared ones below).
    :param endpoint: fal model path for the whole batch; default the connection's.
    :param flux_conn_id: the ``flux`` connection.
    :param max_images: refuse, before any submit, a batch that would generate more images.
    :param allow_failures: how many requests may fail without failing the task.
    :param wait_timeout: seconds the whole batch may take; then what is unfinished is
        cancelled and counts as failed.
    :param deferrable: wait in the triggerer (default) or in the worker (the same wait).
    :param poll_interval: first polling interval of a request, seconds.
    :param max_poll_interval: cap of a request's polling interval, seconds.
    :param max_connections: status and result calls in flight at once while waiting.
    :param reuse_request: on a retry, keep what earlier tries paid for (see above).
    :param start_timeout: per request, as on :class:`FluxSubmitOperator`.
    :param priority: per request, ``normal`` or ``low``.
    :param aws_conn_id: the amazon provider's connection for ``s3://`` inputs.
    :param input_delivery: ``presigned_url`` or ``data_uri`` for ``s3://`` inputs.
    :param results_s3_bucket: write the results to this bucket (with ``aws_conn_id``), return a summary.
    :param results_s3_key: their key; default ``flux/{dag_id}/{run_id}/_results/{task_id}[.{map_index}].jsonl``.
    :param kwargs: the shared request fields (``seed``, ``num_images``, ``aspect_ratio``,
        ``output_format``, ``image_url``, ... the submit operator's names), and
        ``BaseOperator``'s arguments.
    """

    template_fields: Sequence[str] = (
        "requests",
        *REQUEST_FIELDS,
        "endpoint",
        "flux_conn_id",
        "start_timeout",
        "priority",
        "aws_conn_id",
        "results_s3_bucket",
        "results_s3_key",
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {"requests": "json"}
    operator_extra_links = (FluxGalleryLink(),)
    ui_color = "#cdb4f0"

    def __init__(
        self,
        *,
        requests: Any,
        endpoint: str | None = None,
        flux_conn_id: str = DEFAULT_CONN_ID,
        max_images: int = DEFAULT_MAX_IMAGES,
        allow_failures: int = 0,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        deferrable: bool = default_deferrable(),
        poll_interval: float = 1.0,
        max_poll_interval: float = 10.0,
        max_connections: int = 8,
        reuse_request: bool = True,
        start_timeout: float | str | None = None,
        priority: str | None = None,
        aws_conn_id: str | None = "aws_default",
        input_delivery: str = "presigned_url",
        results_s3_bucket: str | None = None,
        results_s3_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        shared = {name: kwargs.pop(name) for name in REQUEST_FIELDS if name in kwargs}
        super().__init__(**kwargs)
        # Before Airflow 3.3 the records are Variables, deleted once the task succeeded.
        self.on_success_callback = with_state_cleanup(self.on_success_callback)
        self.requests = requests
        for name in REQUEST_FIELDS:
            setattr(self, name, shared.get(name))
        self.endpoint = endpoint
        self.flux_conn_id = flux_conn_id
        self.max_images = max_images
        self.allow_failures = allow_failures
        self.wait_timeout = wait_timeout
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.max_connections = max_connections
        self.reuse_request = reuse_request
        self.start_timeout = start_timeout
        self.priority = priority
        self.aws_conn_id = aws_conn_id
        self.input_delivery = input_delivery
        self.results_s3_bucket = results_s3_bucket
        self.results_s3_key = results_s3_key
        if allow_failures < 0 or max_images < 1:
            raise FluxValidationError("allow_failures must be 0 or more and max_images at least 1")

    @cached_property
    def hook(self) -> FluxHook:
        from airflow_flux.hooks.flux import FluxHook

        return FluxHook(flux_conn_id=self.flux_conn_id)

    # -- before any call -------------------------------------------------------------------

    def _payloads(self, endpoint: str) -> list[dict[str, Any]]:
        """Every item validated, in order; refuses the batch naming an item's index and field."""
        try:
            if isinstance(self.requests, str | Mapping):
                raise TypeError
            # A slice, not iteration: a mapped upstream's lazy XCom sequence then fetches
            # every item in one request (iterating probes one past the end).
            items = list(self.requests[:]) if hasattr(self.requests, "__getitem__") else list(self.requests)
        except TypeError:
            raise FluxValidationError(
                f"requests: must be a list of prompts or of dicts of request fields (got {type(self.requests).__name__})"
            ) from None
        shared = {name: getattr(self, name) for name in REQUEST_FIELDS if getattr(self, name) is not None}
        payloads = []
        for index, item in enumerate(items):
            fields = {**shared, "prompt": item} if isinstance(item, str) else {**shared, **dict(item)}
            try:
                payload = build_payload(fields, endpoint)
                check_inputs(payload)
            except FluxValidationError as exc:
                raise FluxValidationError(f"requests[{index}]: {exc}", errors=exc.errors) from None
            payloads.append(payload)
        if not payloads:
            raise FluxValidationError("requests: the batch is empty")
        images = sum(int(p.get("num_images") or 1) for p in payloads)
        if images > self.max_images:
            raise FluxValidationError(
                f"max_images: the batch of {len(payloads)} request(s) would generate {images} images, more than "
                f"max_images={self.max_images}; nothing was submitted (raise max_images to allow it)"
            )
        return payloads

    # -- execute ---------------------------------------------------------------------------

    def execute(self, context: Context) -> list[dict[str, Any]] | dict[str, Any]:
        endpoint = (self.endpoint or self.hook.settings.endpoint).strip("/")
        payloads = self._payloads(endpoint)  # before any call
        self._requests = len(payloads)
        options = RequestOptions.build(start_timeout=self.start_timeout, priority=self.priority)
        resolver = self._resolver(options) if any(has_s3_inputs(p) for p in payloads) else None
        if resolver is not None:
            payloads = self._pin_all(resolver, payloads)  # every s3:// input checked, before any payment
        reuses = [self._reuse(context, endpoint, index, payload) for index, payload in enumerate(payloads)]
        store = task_state(context)
        # One read on a first try: the per-request records are only read when an earlier try
        # (or run) of this task has submitted anything.
        marker = _read(store, MARKER_KEY)
        known = (_read(store, OUTCOMES_KEY) or {}) if marker is not None else {}
        outcomes: dict[int, dict[str, Any]] = {}
        waiting: dict[int, dict[str, Any]] = {}
        to_submit: list[int] = []
        for index, reuse in enumerate(reuses):
            stored = reuse.eligible()[1] if marker is not None else None
            outcome: dict[str, Any] | None = known.get(str(index))
            if stored is None or not outcome or outcome.get("request_id") != stored.handle.get("request_id"):
                outcome = None  # no outcome of *this* request known
            if stored is None or (outcome and outcome.get("status") == "failed" and outcome.get("retryable")):
                to_submit.append(index)
            elif outcome and outcome.get("status") in ("completed", "failed"):
                outcomes[index] = outcome  # kept: completed, or a final refusal not paid for again
            else:
                waiting[index] = stored.handle  # paid for by an earlier try, not finished then
        if len(to_submit) < len(payloads):
            self.log.info(
                "FLUX batch: %d request(s) kept from earlier tries (%d completed or final, %d awaited again); "
                "submitting %d",
                len(payloads) - len(to_submit),
                len(outcomes),
                len(waiting),
                len(to_submit),
            )
        if store is not None and to_submit:
            store.set(MARKER_KEY, {"requests": len(payloads)})
        waiting.update(self._submit_all(endpoint, payloads, reuses, to_submit, options, resolver))
        if not waiting:
            return self._finish(context, endpoint, payloads, outcomes, timed_out=False)
        trigger = self._trigger(waiting)
        if self.deferrable:
            self.defer(
                trigger=trigger,
                method_name="execute_complete",
                timeout=timedelta(seconds=float(self.wait_timeout) + 120),
            )
        event = asyncio.run(_first_event(trigger))  # no triggerer: the same wait, in the worker
        return self.execute_complete(context, event)

    def state_keys(self) -> list[str]:
        """The task state keys this task writes (see :mod:`airflow_flux.state`)."""
        count = getattr(self, "_requests", 0)
        return [MARKER_KEY, OUTCOMES_KEY, *(STATE_KEY.format(index=i) for i in range(count))]

    def _reuse(self, context: Context, endpoint: str, index: int, payload: dict[str, Any]) -> RequestReuse:
        from airflow_flux.identity import RequestIdentity
        from airflow_flux.operators.reuse import RequestReuse

        identity = RequestIdentity.of(endpoint=endpoint, payload=payload, base_url=self.hook.settings.base_url)
        return RequestReuse(
            context,
            hook=self.hook,
            identity=identity,
            log=self.log,
            enabled=self.reuse_request,
            key=STATE_KEY.format(index=index),
        )

    def _pin_all(self, resolver: InputResolver, payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every payload with its ``s3://`` inputs checked and pinned (a few HEADs at a time)."""
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=SUBMIT_CONCURRENCY) as pool:
            futures = [pool.submit(resolver.pin, p) if has_s3_inputs(p) else None for p in payloads]
            pinned = []
            for index, (payload, future) in enumerate(zip(payloads, futures, strict=True)):
                try:
                    pinned.append(future.result() if future is not None else payload)
                except FluxValidationError as exc:
                    for other in futures:
                        if other is not None:
                            other.cancel()
                    raise FluxValidationError(f"requests[{index}]: {exc}", errors=exc.errors) from None
        self.log.info("FLUX batch: s3:// inputs checked in %.1fs; nothing paid for yet", time.monotonic() - started)
        return pinned

    def _submit_all(
        self,
        endpoint: str,
        payloads: list[dict[str, Any]],
        reuses: list[RequestReuse],
        indices: list[int],
        options: RequestOptions,
        resolver: InputResolver | None,
    ) -> dict[int, dict[str, Any]]:
        """Submit ``indices`` in order, a few at a time; each handle recorded as its submit returns.

        After the first submit that fails, no new one starts; the ones in flight are awaited
        and recorded (they are paid for), then the failure is raised naming its item.
        """
        if not indices:
            return {}

        def submit(index: int) -> dict[str, Any]:
            payload = payloads[index]
            sent = resolver.resolve(payload) if resolver is not None and has_s3_inputs(payload) else payload
            handle = self.hook.submit(sent, endpoint=endpoint, options=options).model_dump()
            handle["inputs"] = describe_inputs(payload)  # the pinned s3:// URIs, never a presigned URL
            return handle

        handles: dict[int, dict[str, Any]] = {}
        failure: tuple[int, BaseException] | None = None
        queue = iter(indices)
        started = last_progress = time.monotonic()
        width = min(SUBMIT_CONCURRENCY, len(indices))
        with ThreadPoolExecutor(max_workers=width) as pool:
            running: dict[Future[dict[str, Any]], int] = {}
            while True:
                # Refill up to the pool's width only: a queued submit could not be taken back.
                while failure is None and len(running) < width and (index := next(queue, None)) is not None:
                    running[pool.submit(submit, index)] = index
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    if (exc := future.exception()) is not None:
                        if failure is None:
                            failure = (index, exc)
                            self._stop_submitting(index, in_flight=len(running))
                        continue
                    handles[index] = future.result()
                    reuses[index].record(handles[index])  # the task state is written from this thread only
                if time.monotonic() - last_progress >= PROGRESS_INTERVAL:
                    last_progress = time.monotonic()
                    self.log.info("FLUX batch: submitted %d of %d", len(handles), len(indices))
        self.log.info("FLUX batch: submitted %d request(s) in %.1fs", len(handles), time.monotonic() - started)
        if failure is not None:
            index, exc = failure
            raise FluxError(
                f"requests[{index}]: the submit failed: {exc}. {len(handles)} request(s) submitted by this try are "
                f"recorded (a retry does not pay for them again); {len(indices) - len(handles) - 1} not submitted"
            ) from exc
        return handles

    def _stop_submitting(self, index: int, *, in_flight: int) -> None:
        """Called once, when the first failed submit is seen: from then on no submit starts."""
        self.log.warning(
            "FLUX batch: requests[%d]: the submit failed; no new submit starts, the %d in flight are awaited "
            "and recorded",
            index,
            in_flight,
        )

    def _resolver(self, options: RequestOptions) -> InputResolver:
        return InputResolver.for_task(
            self.aws_conn_id, delivery=self.input_delivery, start_timeout=options.start_timeout
        )

    def _trigger(self, waiting: dict[int, dict[str, Any]]) -> Any:
        from airflow_flux.triggers.batch import FluxBatchTrigger, pack_handles

        return FluxBatchTrigger(
            flux_conn_id=self.flux_conn_id,
            requests=pack_handles(sorted(waiting.items())),
            end_time=time.time() + float(self.wait_timeout),
            poll_interval=self.poll_interval,
            max_poll_interval=self.max_poll_interval,
            max_connections=self.max_connections,
        )

    def execute_complete(self, context: Context, event: dict[str, Any]) -> list[dict[str, Any]] | dict[str, Any]:
        """Resume after the batch's event: record each outcome, return them all in input order."""
        from airflow_flux.events import FluxBatchEvent

        batch = FluxBatchEvent.from_payload(event)
        endpoint = (self.endpoint or self.hook.settings.endpoint).strip("/")
        payloads = self._payloads(endpoint)
        self._requests = len(payloads)
        store = task_state(context)
        # What earlier tries kept (completed, or refused for good), then this wait's outcomes.
        known = _read(store, OUTCOMES_KEY) or {}
        for outcome in batch.outcomes:
            record = outcome.model_dump(mode="json", exclude_none=True)
            if outcome.status != "pending":
                known[str(outcome.index)] = record  # kept for a retry, results included
            else:
                known.pop(str(outcome.index), None)  # a retry awaits it again
                if batch.status == "timeout":
                    self._cancel({"request_id": outcome.request_id, "endpoint": endpoint})
        if store is not None:
            store.set(OUTCOMES_KEY, known)
        outcomes = {int(index): record for index, record in known.items()}
        for outcome in batch.outcomes:
            if outcome.status == "pending":
                outcomes[outcome.index] = outcome.model_dump(mode="json", exclude_none=True)
        # The s3:// inputs as pinned when each request was paid for (their objects may have
        # changed since; what was edited is what the record says).
        pinned: dict[int, Any] = {}
        for index, payload in enumerate(payloads):
            if has_s3_inputs(payload):
                stored = StoredRequest.load(store.get(STATE_KEY.format(index=index))) if store is not None else None
                pinned[index] = stored.handle.get("inputs") if stored is not None else None
        return self._finish(context, endpoint, payloads, outcomes, timed_out=batch.status == "timeout", inputs=pinned)

    def _cancel(self, handle: dict[str, Any]) -> None:
        """Cancel an unfinished request (its URLs are built from its id on the connection)."""
        try:
            self.log.info("Cancel of FLUX request %s: %s", handle["request_id"], self.hook.cancel(handle))
        except Exception as exc:
            self.log.warning("Could not cancel FLUX request %s: %s", handle["request_id"], exc)

    def _finish(
        self,
        context: Context,
        endpoint: str,
        payloads: list[dict[str, Any]],
        outcomes: dict[int, dict[str, Any]],
        *,
        timed_out: bool,
        inputs: Mapping[int, Any] | None = None,
    ) -> list[dict[str, Any]] | dict[str, Any]:
        price = self.hook.settings.price_per_image
        results: list[dict[str, Any]] = []
        for index, payload in enumerate(payloads):
            outcome = outcomes.get(index) or {"status": "pending"}
            if outcome.get("status") == "pending":
                outcome = {**outcome, "error": outcome.get("error") or "not finished within wait_timeout"}
            # flux_conn_id: the copy to S3 downloads the images under this connection's allowed hosts.
            common = {"index": index, "prompt": payload.get("prompt"), "endpoint": endpoint}
            common["flux_conn_id"] = self.flux_conn_id
            common["inputs"] = inputs[index] if inputs and index in inputs else describe_inputs(payload)
            if outcome.get("status") == "completed":
                result = dict(outcome.get("result") or {})
                images = len(result.get("images") or [])
                result["cost_usd"] = cost_usd(endpoint, images, price_per_image=price)
                results.append({**result, **common, "request_id": outcome.get("request_id"), "status": "completed"})
            else:
                results.append(
                    {
                        **common,
                        "request_id": outcome.get("request_id"),
                        "status": "failed",
                        "error": outcome.get("error"),
                        "error_type": outcome.get("error_type"),
                        "status_code": outcome.get("status_code"),
                    }
                )
        failed = [r for r in results if r["status"] == "failed"]
        total = sum(r.get("cost_usd") or 0 for r in results)
        self.log.info(
            "FLUX batch: %d of %d completed, %d failed; cost $%.4f",
            len(results) - len(failed),
            len(results),
            len(failed),
            total,
        )
        # Written before a failure is raised: what was paid for is on record either way.
        summary = self._write_results(context, results, endpoint) if self.results_s3_bucket else None
        if len(failed) > self.allow_failures:
            listed = "; ".join(
                f"requests[{r['index']}] ({r.get('request_id')}): {r.get('error_type') or 'error'}: {r.get('error')}"
                for r in failed[:10]
            )
            error = FluxTimeoutError if timed_out else FluxError
            raise error(
                f"{len(failed)} of {len(results)} FLUX request(s) failed (allow_failures={self.allow_failures}): "
                f"{listed}{' ...' if len(failed) > 10 else ''}"
            )
        return summary if summary is not None else results

    def _write_results(self, context: Context, results: list[dict[str, Any]], endpoint: str) -> dict[str, Any]:
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        from airflow_flux.results import default_results_key, summarize, write_results

        ti = context["ti"]
        owner = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "map_index": ti.map_index}
        key = self.results_s3_key or default_results_key(owner)
        write_results(
            S3Hook(aws_conn_id=self.aws_conn_id).get_conn(), str(self.results_s3_bucket), key, results, owner=owner
        )
        summary = summarize(results, f"s3://{self.results_s3_bucket}/{key}", endpoint, self.flux_conn_id)
        self.log.info("FLUX batch: results of %d request(s) written to %s", len(results), summary.results_uri)
        return summary.model_dump(mode="json")


def _read(store: Any, key: str) -> dict[str, Any] | None:
    """A dict stored under ``key``, or None (no store, nothing stored, or not a dict)."""
    value = store.get(key) if store is not None else None
    return dict(value) if isinstance(value, Mapping) else None


async def _first_event(trigger: Any) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    raise FluxError("The FLUX batch trigger ended without an event")
