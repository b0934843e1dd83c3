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

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from airflow_flux.exceptions import FluxValidationError
from airflow_flux.identity import DEFAULT_CONN_ID, StoredRequest
from airflow_flux.lineage import FluxLineage, FluxLineageMixin
from airflow_flux.links import FluxGalleryLink
from airflow_flux.metrics import request_finished
from airflow_flux.models import RequestOptions, build_payload
from airflow_flux.operators.batch_items import check_failures, result_line, results_place
from airflow_flux.operators.batch_requests import closing, fan_out, open_requests, where
from airflow_flux.operators.batch_submit import first_event, read_dict
from airflow_flux.operators.flux import REQUEST_FIELDS
from airflow_flux.operators.inputs import InputResolver, check_inputs, has_s3_inputs
from airflow_flux.operators.wait import DEFAULT_WAIT_TIMEOUT, default_deferrable
from airflow_flux.results import Tally
from airflow_flux.state import task_state, with_state_cleanup

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_flux.hooks.flux import FluxHook
    from airflow_flux.operators.batch_window import BatchWindow
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
#: Requests submitted and unfinished at once when the connection does not say its ``concurrency``.
DEFAULT_MAX_IN_FLIGHT = 20
#: A batch of more requests runs as a window in the worker whatever ``max_in_flight`` says:
#: the single wait keeps every outcome in one task state value (Airflow 3.3 warns past 64 KiB).
SINGLE_WAIT_LIMIT = 100


class FluxBatchGenerateOperator(FluxLineageMixin, BaseOperator):
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
        request fields (an item's own fields win over the shared ones below); or the
        ``s3://`` URI of a JSON Lines file of them, one per line, read with ``aws_conn_id``
        a line at a time (a batch of 100,000 then holds neither the DB nor the worker's memory).
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
    :param max_in_flight: requests submitted and unfinished at once; default twice the
        connection's ``concurrency``, else 20. A batch of more (or of more than 100) runs as a
        window in the worker (:mod:`~airflow_flux.operators.batch_window`); a smaller one is
        submitted at once and awaited in the triggerer.
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
        max_in_flight: int | None = None,
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
        self.max_in_flight = max_in_flight
        if allow_failures < 0 or max_images < 1:
            raise FluxValidationError("allow_failures must be 0 or more and max_images at least 1")
        if max_in_flight is not None and max_in_flight < 1:
            raise FluxValidationError(f"max_in_flight: must be at least 1 (got {max_in_flight})")
        self._window: BatchWindow | None = None

    @cached_property
    def hook(self) -> FluxHook:
        from airflow_flux.hooks.flux import FluxHook

        return FluxHook(flux_conn_id=self.flux_conn_id)

    # -- before any call -------------------------------------------------------------------

    def _items(self, endpoint: str) -> Sequence[Any]:
        """The batch's requests (see :func:`~airflow_flux.operators.batch_requests.fan_out`)."""
        items = open_requests(self.requests, aws_conn_id=self.aws_conn_id, log=self.log)
        shared = {"num_images": getattr(self, "num_images", None), "seed": getattr(self, "seed", None)}
        return fan_out(items, endpoint, **shared, check=lambda n: self._check_images(len(items), n), log=self.log)

    def _payload(self, items: Sequence[Any], index: int, endpoint: str) -> dict[str, Any]:
        """Item ``index`` as the payload sent, validated; refused naming its index and field."""
        item = items[index]
        shared = {name: getattr(self, name) for name in REQUEST_FIELDS if getattr(self, name) is not None}
        if not isinstance(item, str | Mapping):
            raise FluxValidationError(
                f"{where(items, index)}: a {type(item).__name__}; each request is a prompt or a dict of request fields"
            )
        fields = {**shared, "prompt": item} if isinstance(item, str) else {**shared, **item}
        fields = {name: value for name, value in fields.items() if value is not None}  # None: not sent
        try:
            payload = build_payload(fields, endpoint)
            check_inputs(payload)
        except FluxValidationError as exc:
            raise FluxValidationError(f"{where(items, index)}: {exc}", errors=exc.errors) from None
        return payload

    def _check_images(self, requests: int, images: int) -> None:
        if images > self.max_images:
            raise FluxValidationError(
                f"max_images: the batch of {requests} request(s) would generate {images} images, more than "
                f"max_images={self.max_images}; nothing was submitted (raise max_images to allow it)"
            )

    def _payloads(self, endpoint: str, items: Sequence[Any] | None = None) -> list[dict[str, Any]]:
        """Every item validated, in order; refuses the batch naming an item's index and field."""
        if items is None:
            with closing(self._items(endpoint)) as items:
                return self._payloads(endpoint, items)
        payloads = [self._payload(items, index, endpoint) for index in range(len(items))]
        self._check_images(len(payloads), sum(int(p.get("num_images") or 1) for p in payloads))
        return payloads

    def _window_size(self) -> int:
        if self.max_in_flight is not None:
            return int(self.max_in_flight)
        concurrency = self.hook.settings.concurrency
        return 2 * concurrency if concurrency else DEFAULT_MAX_IN_FLIGHT

    # -- execute ---------------------------------------------------------------------------

    def execute(self, context: Context) -> list[dict[str, Any]] | dict[str, Any]:
        endpoint = (self.endpoint or self.hook.settings.endpoint).strip("/")
        self.flux_lineage = FluxLineage(endpoint=endpoint)
        with closing(self._items(endpoint)) as items:
            return self._execute(context, endpoint, items)

    def _execute(self, context: Context, endpoint: str, items: Sequence[Any]) -> list[dict[str, Any]] | dict[str, Any]:
        window = self._window_size()
        if len(items) > min(window, SINGLE_WAIT_LIMIT):
            return self._execute_window(context, endpoint, items, window)
        payloads = self._payloads(endpoint, items)  # before any call
        self._requests = len(payloads)
        options = RequestOptions.build(start_timeout=self.start_timeout, priority=self.priority)
        resolver = self._resolver(options) if any(has_s3_inputs(p) for p in payloads) else None
        if resolver is not None:
            payloads = self._pin_all(resolver, payloads)  # every s3:// input checked, before any payment
        reuses = [self._reuse(context, endpoint, index, payload) for index, payload in enumerate(payloads)]
        store = task_state(context)
        # One read on a first try: the per-request records are only read when an earlier try
        # (or run) of this task has submitted anything.
        marker = read_dict(store, MARKER_KEY)
        known = (read_dict(store, OUTCOMES_KEY) or {}) if marker is not None else {}
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
        event = first_event(trigger)  # no triggerer: the same wait, in the worker
        return self.execute_complete(context, event)

    def state_keys(self) -> list[str]:
        """The task state keys this task writes (see :mod:`airflow_flux.state`)."""
        count = getattr(self, "_requests", 0)
        window = self._window.state_keys() if self._window is not None else []
        return [MARKER_KEY, OUTCOMES_KEY, *(STATE_KEY.format(index=i) for i in range(count)), *window]

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
        from airflow_flux.operators.batch_submit import pin_all

        return pin_all(resolver, payloads, log=self.log)

    def _submit_all(
        self,
        endpoint: str,
        payloads: list[dict[str, Any]],
        reuses: list[RequestReuse],
        indices: list[int],
        options: RequestOptions,
        resolver: InputResolver | None,
    ) -> dict[int, dict[str, Any]]:
        from airflow_flux.operators.batch_submit import submit_all

        return submit_all(
            self.hook,
            endpoint,
            payloads,
            indices,
            options=options,
            resolver=resolver,
            record=lambda index, handle: reuses[index].record(handle),
            on_failure=self._stop_submitting,
            log=self.log,
        )

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
        self.flux_lineage = FluxLineage(endpoint=endpoint)
        payloads = self._payloads(endpoint)
        self._requests = len(payloads)
        store = task_state(context)
        # What earlier tries kept (completed, or refused for good), then this wait's outcomes.
        known = read_dict(store, OUTCOMES_KEY) or {}
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
        # This wait's outcomes are new; those kept from earlier tries were counted by those tries.
        fresh = {o.index: o.waited_seconds for o in batch.outcomes if o.status != "pending"}
        return self._finish(
            context, endpoint, payloads, outcomes, timed_out=batch.status == "timeout", inputs=pinned, fresh=fresh
        )

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
        fresh: Mapping[int, float | None] | None = None,
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """The batch's items; ``fresh``: the requests whose outcome this try learned (counted in
        the metrics), with the seconds each was awaited."""
        price = self.hook.settings.prices
        results = [
            result_line(
                index,
                payload,
                outcomes.get(index) or {"status": "pending"},
                endpoint=endpoint,
                flux_conn_id=self.flux_conn_id,
                prices=price,
                inputs=inputs.get(index) if inputs else None,
            )
            for index, payload in enumerate(payloads)
        ]
        tally = Tally(self.flux_lineage)
        for line in results:
            tally.add(line)
            if fresh is not None and line["index"] in fresh:
                request_finished(line, waited_seconds=fresh[line["index"]])
        self._log_totals(tally)
        # Written before a failure is raised: what was paid for is on record either way.
        summary = self._write_results(context, results, endpoint) if self.results_s3_bucket else None
        self._check_failures(tally, [r for r in results if r["status"] == "failed"][:10], timed_out=timed_out)
        return summary if summary is not None else results

    def _log_totals(self, tally: Tally) -> None:
        self.log.info(
            "FLUX batch: %d of %d completed, %d failed; cost $%.4f",
            tally.completed,
            tally.requests,
            tally.failed,
            tally.cost or 0.0,
        )

    def _check_failures(self, tally: Tally, failed: Sequence[Mapping[str, Any]], *, timed_out: bool) -> None:
        check_failures(tally, failed, allow_failures=self.allow_failures, timed_out=timed_out)

    def _results_place(self, context: Context) -> tuple[Any, str, dict[str, Any]]:
        return results_place(context, self.results_s3_key, self.aws_conn_id)

    def _write_results(
        self,
        context: Context,
        results: Iterable[dict[str, Any]],
        endpoint: str,
        place: tuple[Any, str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        from airflow_flux.results import write_results

        client, key, owner = place or self._results_place(context)
        tally = Tally()

        def counted() -> Iterator[dict[str, Any]]:
            for line in results:
                tally.add(line)
                yield line

        write_results(client, str(self.results_s3_bucket), key, counted(), owner=owner)
        summary = tally.summary(f"s3://{self.results_s3_bucket}/{key}", endpoint, self.flux_conn_id)
        if self.flux_lineage is not None:
            self.flux_lineage.add_output(summary.results_uri)
        self.log.info("FLUX batch: results of %d request(s) written to %s", tally.requests, summary.results_uri)
        return summary.model_dump(mode="json")

    # -- a window (a batch larger than max_in_flight) ---------------------------------------

    def _execute_window(
        self, context: Context, endpoint: str, items: Sequence[Any], max_in_flight: int
    ) -> list[dict[str, Any]] | dict[str, Any]:
        from airflow_flux.operators.batch_window import run_window

        return run_window(self, context, endpoint, items, max_in_flight)

    def on_kill(self) -> None:
        """Cancel the window's requests in flight (a deferred batch's trigger cancels its own)."""
        if self._window is not None:
            self._window.cancel_in_flight()
