"""Operators that submit FLUX.1 Kontext [pro] requests and wait for them."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from airflow.sdk import BaseOperator

from airflow_flux.exceptions import FluxRequestFailedError, FluxValidationError
from airflow_flux.identity import DEFAULT_CONN_ID, STATE_KEY
from airflow_flux.lineage import FluxLineage, FluxLineageMixin
from airflow_flux.links import FluxGalleryLink, FluxRequestLink
from airflow_flux.models import KONTEXT_TEXT_TO_IMAGE, RequestOptions, build_payload
from airflow_flux.operators.inputs import (
    INPUT_DELIVERIES,
    InputResolver,
    check_inputs,
    describe_inputs,
    has_s3_inputs,
)
from airflow_flux.operators.wait import DEFAULT_WAIT_TIMEOUT, FluxWaitMixin
from airflow_flux.state import with_state_cleanup
from airflow_flux.xcom_keys import LINK_XCOM_KEY

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_flux.hooks.flux import FluxHook

#: Request fields exposed as operator arguments (and template fields).
REQUEST_FIELDS: tuple[str, ...] = (
    "prompt",
    "seed",
    "guidance_scale",
    "num_images",
    "output_format",
    "safety_tolerance",
    "aspect_ratio",
    "enhance_prompt",
    "sync_mode",
    "image_url",
    "image_urls",
    # FLUX.2's (airflow_flux.families.flux2)
    "image_size",
    "enable_safety_checker",
    "num_inference_steps",
    "enable_prompt_expansion",
)
#: What a completed request's record keeps of its result, for a retry after fal dropped it
#: (the fields the worker adds, cost and inputs, are computed again).
KEPT_RESULT_FIELDS: tuple[str, ...] = (
    "images",
    "seed",
    "has_nsfw_concepts",
    "timings",
    "prompt",
    "metrics",
    "billable_units",
)
#: Stand-ins for required fields that are only known after rendering (checked then).
_TEMPLATED = {
    "prompt": "(templated)",
    "image_url": "https://templated.invalid/",
    "image_urls": ["https://templated.invalid/"],
}


def _is_templated(value: Any) -> bool:
    """True for values only known after rendering (Jinja strings, XComArgs, ...)."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_is_templated(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_is_templated(v) for v in value)
    return not isinstance(value, int | float | bool | type(None))


class FluxSubmitOperator(FluxLineageMixin, BaseOperator):
    """Validate a FLUX request (FLUX.1 Kontext [pro] by default, or FLUX.2) and submit it to fal's queue.

    Returns the request handle (``request_id``, ``status_url``, ``response_url``,
    ``cancel_url``, ``endpoint``, ``flux_conn_id``) as XCom, for
    :class:`~airflow_flux.sensors.FluxStatusSensor` and
    :class:`~airflow_flux.transfers.FluxToS3Operator`, which use its connection unless told
    otherwise. Values known when the DAG is parsed are validated in the constructor (a bad
    value fails the DAG import); templated values are validated after rendering, before the call.

    Retry-safe and right: the handle is saved in the task's ``task_state_store`` right after
    submit, with the fingerprint of what was sent (endpoint, payload, the connection's base
    URL). An automatic retry reuses that request while it is queued, running or completed
    without error, and only when this try would send the very same request; a changed input,
    a user's clear, or a request that failed submits anew (see
    :mod:`airflow_flux.operators.reuse`).

    :param prompt: what to draw.
    :param seed: seed for reproducible output.
    :param guidance_scale: 1 to 20.
    :param num_images: 1 to 4.
    :param output_format: ``jpeg`` or ``png``.
    :param safety_tolerance: ``"1"`` (strictest) to ``"6"`` (FLUX.2: to ``"5"``).
    :param aspect_ratio: 21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16 or 9:21.
    :param enhance_prompt: let the API rewrite the prompt.
    :param sync_mode: images inline as ``data:`` URIs (large XCom; prefer the default).
    :param image_url: the image to edit (``fal-ai/flux-pro/kontext`` and ``.../max``):
        ``s3://bucket/key`` (sent presigned, or inlined with ``input_delivery="data_uri"``),
        an ``https://`` URL or a ``data:`` URI.
    :param image_urls: the reference images of the ``.../multi`` endpoints and of FLUX.2's
        ``/edit`` endpoints, the same forms.
    :param image_size: FLUX.2's output size: a preset (``square_hd``, ``square``,
        ``portrait_4_3``, ``portrait_16_9``, ``landscape_4_3``, ``landscape_16_9``) or
        ``{"width": W, "height": H}``; an edit may ask ``auto``.
    :param enable_safety_checker: FLUX.2: let the API check the output.
    :param num_inference_steps: FLUX.2 [flex] and [dev]: denoising steps.
    :param enable_prompt_expansion: FLUX.2 [flex] and [dev]: let the API expand the prompt.
    :param extra_input: more input fields, for other fal endpoints (explicit arguments win).
    :param endpoint: fal model path; defaults to the connection's (Kontext text-to-image).
        The typed family: ``fal-ai/flux-pro/kontext`` (edit), ``.../kontext/multi``,
        ``.../kontext/max``, ``.../kontext/max/multi``, ``.../kontext/max/text-to-image``;
        FLUX.2: ``fal-ai/flux-2-pro``, ``fal-ai/flux-2-flex``, ``fal-ai/flux-2-max``,
        ``fal-ai/flux-2`` ([dev]), each with ``/edit`` (see :mod:`airflow_flux.families`).
    :param start_timeout: seconds the request may wait to start (queue included), more than 1
        (``X-Fal-Request-Timeout``); when it passes the task fails, nothing is billed.
    :param priority: ``normal`` or ``low`` (``X-Fal-Queue-Priority``), e.g. low for backfills.
    :param aws_conn_id: the amazon provider's connection for ``s3://`` inputs.
    :param input_delivery: how ``s3://`` inputs reach fal: ``presigned_url`` (default) or
        ``data_uri`` (inlined, up to 10 MiB each).
    :param input_url_expires_in: lifetime of presigned input URLs, seconds; default one
        hour, or the start deadline plus 15 minutes when that is longer.
    :param webhook_url: optional ``fal_webhook`` notified on completion.
    :param flux_conn_id: the ``flux`` connection.
    :param reuse_request: on an automatic retry, reuse the request an earlier try submitted
        for the same input (``ResumableJobMixin``'s ``durable``); False submits on every try.
    """

    template_fields: Sequence[str] = (
        *REQUEST_FIELDS,
        "extra_input",
        "endpoint",
        "webhook_url",
        "flux_conn_id",
        "start_timeout",
        "priority",
        "aws_conn_id",
        "input_delivery",
    )
    template_fields_renderers: ClassVar[dict[str, str]] = {"extra_input": "json"}
    operator_extra_links = (FluxRequestLink(), FluxGalleryLink())
    ui_color = "#d9c8f5"

    def __init__(
        self,
        *,
        prompt: str,
        seed: int | str | None = None,
        guidance_scale: float | str | None = None,
        num_images: int | str | None = None,
        output_format: str | None = None,
        safety_tolerance: str | int | None = None,
        aspect_ratio: str | None = None,
        enhance_prompt: bool | str | None = None,
        sync_mode: bool | str | None = None,
        image_url: str | None = None,
        image_urls: list[str] | str | None = None,
        image_size: str | dict[str, int] | None = None,
        enable_safety_checker: bool | str | None = None,
        num_inference_steps: int | str | None = None,
        enable_prompt_expansion: bool | str | None = None,
        extra_input: dict[str, Any] | None = None,
        endpoint: str | None = None,
        webhook_url: str | None = None,
        flux_conn_id: str | None = DEFAULT_CONN_ID,
        reuse_request: bool = True,
        start_timeout: float | str | None = None,
        priority: str | None = None,
        aws_conn_id: str | None = "aws_default",
        input_delivery: str = "presigned_url",
        input_url_expires_in: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # Before Airflow 3.3 the request's record is a Variable, deleted once the task succeeded.
        self.on_success_callback = with_state_cleanup(self.on_success_callback)
        self.prompt = prompt
        self.seed = seed
        self.guidance_scale = guidance_scale
        self.num_images = num_images
        self.output_format = output_format
        self.safety_tolerance = safety_tolerance
        self.aspect_ratio = aspect_ratio
        self.enhance_prompt = enhance_prompt
        self.sync_mode = sync_mode
        self.image_url = image_url
        self.image_urls = image_urls
        self.image_size = image_size
        self.enable_safety_checker = enable_safety_checker
        self.num_inference_steps = num_inference_steps
        self.enable_prompt_expansion = enable_prompt_expansion
        self.extra_input = extra_input
        self.endpoint = endpoint
        self.webhook_url = webhook_url
        self.flux_conn_id = flux_conn_id
        self.reuse_request = reuse_request
        self.start_timeout = start_timeout
        self.priority = priority
        self.aws_conn_id = aws_conn_id
        self.input_delivery = input_delivery
        self.input_url_expires_in = input_url_expires_in
        self._validate_known_values()

    def _request_fields(self, *, known_only: bool = False) -> dict[str, Any]:
        extra = self.extra_input
        if extra is None or (known_only and _is_templated(extra)):
            extra = {}
        if not isinstance(extra, Mapping):
            raise FluxValidationError(f"extra_input: must be a mapping of input fields (got {type(extra).__name__})")
        fields = dict(extra)
        fields.update({name: getattr(self, name) for name in REQUEST_FIELDS if getattr(self, name) is not None})
        return fields

    def _validate_known_values(self) -> None:
        """Fail at DAG parse time on values that are already known and wrong."""
        endpoint = self.endpoint
        if endpoint is not None and _is_templated(endpoint):
            return
        given = self._request_fields(known_only=True)
        fields = {k: v for k, v in given.items() if not _is_templated(v)}
        for name, stand_in in _TEMPLATED.items():
            if name in given and name not in fields:
                fields[name] = stand_in  # checked after rendering
        known_options = {
            name: getattr(self, name)
            for name in ("start_timeout", "priority")
            if not _is_templated(getattr(self, name))
        }
        try:
            build_payload(fields, endpoint or KONTEXT_TEXT_TO_IMAGE)
            check_inputs(fields)
            RequestOptions.build(**known_options)
            if not _is_templated(self.input_delivery) and self.input_delivery not in INPUT_DELIVERIES:
                raise FluxValidationError(
                    f"input_delivery: must be one of 'presigned_url', 'data_uri' (got {self.input_delivery!r})"
                )
        except FluxValidationError as exc:
            raise FluxValidationError(f"Task {self.task_id!r}: {exc}", errors=exc.errors) from None

    @cached_property
    def hook(self) -> FluxHook:
        from airflow_flux.hooks.flux import FluxHook

        return FluxHook(flux_conn_id=self.flux_conn_id or DEFAULT_CONN_ID)

    def submit(self, context: Context) -> dict[str, Any]:
        """Submit (or reuse) the request and record it before anything else can fail."""
        # Imported here, not at the top: a DAG parse imports this module and never submits.
        from airflow_flux.identity import RequestIdentity
        from airflow_flux.operators.reuse import Decision, RequestReuse

        endpoint = (self.endpoint or self.hook.settings.endpoint).strip("/")
        # The rendered values, checked before any call; the caller's own (s3:// inputs pinned
        # to the objects they are now, not presigned), so the fingerprint is the same on every
        # try unless an input object was replaced.
        payload = build_payload(self._request_fields(), endpoint)
        check_inputs(payload)
        options = RequestOptions.build(start_timeout=self.start_timeout, priority=self.priority)
        resolver = None
        if has_s3_inputs(payload):
            resolver = InputResolver.for_task(
                self.aws_conn_id,
                delivery=self.input_delivery,
                start_timeout=options.start_timeout,
                expires_in=self.input_url_expires_in,
            )
        if resolver is not None:
            payload = resolver.pin(payload)
        reuse = RequestReuse(
            context,
            hook=self.hook,
            identity=RequestIdentity.of(endpoint=endpoint, payload=payload, base_url=self.hook.settings.base_url),
            log=self.log,
            enabled=self.reuse_request,
        )
        handle = reuse.reusable()
        self._already_completed = reuse.decision is Decision.ALREADY_SUCCEEDED
        self._kept_result = reuse.result
        if handle is None:
            sent = resolver.resolve(payload) if resolver is not None else payload
            handle = self.hook.submit(
                sent, endpoint=endpoint, webhook_url=self.webhook_url, options=options
            ).model_dump()
            handle["inputs"] = describe_inputs(payload)  # the caller's URIs, never a presigned one
            reuse.record(handle)
            self.log.info("Submitted FLUX request %s", handle["request_id"])
        # XCom right away: if the worker dies now, the id is still on record.
        context["ti"].xcom_push(key=LINK_XCOM_KEY, value=handle["response_url"])
        self.flux_lineage = FluxLineage.of({**handle, "status": "submitted"})
        return handle

    def execute(self, context: Context) -> dict[str, Any]:
        return self.submit(context)

    def state_keys(self) -> list[str]:
        """The task state keys this task writes (see :mod:`airflow_flux.state`)."""
        return [STATE_KEY]


class FluxGenerateOperator(FluxWaitMixin, FluxSubmitOperator):
    """Submit a FLUX request and wait for its result, in one task.

    The wait is deferred to the triggerer by default (no worker slot held). Returns the
    result (``images``, ``seed``, ``has_nsfw_concepts``, ``prompt``, ``timings``,
    ``request_id``) like :class:`~airflow_flux.sensors.FluxStatusSensor`. Takes every
    argument of :class:`FluxSubmitOperator`, plus:

    :param deferrable: wait in the triggerer or poll in the worker; default from
        ``[operators] default_deferrable`` when the deployment sets it, else True.
    :param wait_timeout: seconds to wait for completion before cancelling and failing.
    :param use_stream: follow the SSE status stream when available.
    :param poll_interval: first polling interval (polling fallback), seconds.
    :param max_poll_interval: cap of the polling interval, seconds.
    :param cancel_on_timeout: cancel the remote request when the wait times out.
    :param api_logs: ask the API for its log lines while waiting and print them in the task
        log; False makes each status smaller (cheaper for thousands of waits per triggerer).
    """

    def __init__(
        self,
        *,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.wait_timeout = wait_timeout

    def _wait_timeout(self) -> float:
        return float(self.wait_timeout)

    def execute(self, context: Context) -> dict[str, Any]:
        handle = self._handle = self.submit(context)
        if self._already_completed:
            # A retry whose request already completed: its result was kept, or is one call
            # away. Deferring would only add a round trip, and a trigger that fires before this
            # worker has exited can make the scheduler fail the task (apache/airflow#66374).
            if self._kept_result is not None:
                return self._return_value(self._kept_result, handle, 0.0, fresh=False)
            return self._keep_outcome(context, handle, lambda: self._result(handle, 0.0))
        if self.deferrable:
            self._defer_wait(handle)
        return self._keep_outcome(context, handle, lambda: self._wait_blocking(handle))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resume after the trigger's event; what became of the request is kept for a retry."""
        handle = event.get("handle") if isinstance(event, Mapping) else None
        resume = super().execute_complete
        return self._keep_outcome(context, handle or {}, lambda: resume(context, event))

    def _keep_outcome(
        self, context: Context, handle: Mapping[str, Any], wait: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """Run ``wait`` and keep its outcome with the request's record (see :mod:`.reuse`).

        A retry then returns the kept result without a call (fal drops it after an hour), or
        meets a final refusal without paying again. A failure to reach the API is not an
        outcome: nothing is kept, and the retry looks the request up again.
        """
        from airflow_flux.hooks.retry import RETRYABLE_STATUS, worth_resubmitting
        from airflow_flux.operators.reuse import record_outcome

        try:
            result = wait()
        except FluxRequestFailedError as exc:
            if exc.status_code:
                retryable = worth_resubmitting(
                    status_code=exc.status_code,
                    error_type=exc.error_type,
                    retryable=exc.status_code in RETRYABLE_STATUS,
                )
                outcome = {"status": "failed", "error": exc.detail or str(exc), "error_type": exc.error_type}
                record_outcome(context, handle, {**outcome, "status_code": exc.status_code, "retryable": retryable})
            raise
        kept = {k: result[k] for k in KEPT_RESULT_FIELDS if result.get(k) is not None}
        record_outcome(context, handle, {"status": "completed", "result": kept})
        return result

    def on_kill(self) -> None:
        # Non-deferred runs only: a deferred task is cancelled by the trigger's on_kill.
        handle = getattr(self, "_handle", None)
        if handle:
            self._cancel_quietly(handle)
