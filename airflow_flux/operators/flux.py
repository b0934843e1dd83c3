"""Operators that submit FLUX.1 Kontext [pro] requests and wait for them."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, cast

from airflow.sdk import BaseOperator, BaseOperatorLink

from airflow_flux.exceptions import FluxAPIError, FluxError, FluxRequestFailedError, FluxValidationError
from airflow_flux.identity import DEFAULT_CONN_ID, RequestIdentity, conn_id_for
from airflow_flux.models import KONTEXT_TEXT_TO_IMAGE, build_payload
from airflow_flux.operators.reuse import RequestReuse
from airflow_flux.plugins.links import FluxGalleryLink

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import TaskInstanceKey

    from airflow_flux.hooks.flux import FluxHook
    from airflow_flux.models import FluxStatus

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
)
#: XCom key holding the link the "FLUX request" extra link opens.
LINK_XCOM_KEY = "flux_request_url"
DEFAULT_WAIT_TIMEOUT = 60 * 60.0


def _is_templated(value: Any) -> bool:
    """True for values only known after rendering (Jinja strings, XComArgs, ...)."""
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, Mapping):
        return any(_is_templated(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_is_templated(v) for v in value)
    return not isinstance(value, int | float | bool | type(None))


class FluxRequestLink(BaseOperatorLink):
    """Extra link to the request's result (or its page, when the connection sets ``request_page_url``)."""

    name = "FLUX request"

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(ti_key=ti_key, key=LINK_XCOM_KEY) or ""


class FluxWaitMixin:
    """Waiting on a submitted request, shared by the sensor and the generate operator.

    Deferrable: the wait runs in the triggerer (:class:`FluxStatusTrigger`); the resumed
    task reads everything from the event, since it is a new instance.
    """

    flux_conn_id: str | None
    deferrable: bool
    use_stream: bool
    poll_interval: float
    max_poll_interval: float
    cancel_on_timeout: bool
    api_logs: bool
    log: Any

    @cached_property
    def hook(self) -> FluxHook:
        from airflow_flux.hooks.flux import FluxHook

        return FluxHook(flux_conn_id=self.flux_conn_id or DEFAULT_CONN_ID)

    def _use_connection_of(self, handle: Mapping[str, Any]) -> None:
        """Wait with the connection the request was submitted with, unless the task names another."""
        conn_id, warning = conn_id_for(handle, self.flux_conn_id)
        if warning:
            self.log.warning(warning)
        if conn_id != self.flux_conn_id:
            self.flux_conn_id = conn_id
            self.__dict__.pop("hook", None)  # a hook made for another connection

    def _wait_timeout(self) -> float:
        raise NotImplementedError

    def _timeout_error(self, message: str) -> BaseException:
        from airflow_flux.exceptions import FluxTimeoutError

        return FluxTimeoutError(message)

    def _defer_wait(self, handle: Mapping[str, Any]) -> None:
        from airflow_flux.triggers.flux import FluxStatusTrigger

        wait = self._wait_timeout()
        cast("BaseOperator", self).defer(
            trigger=FluxStatusTrigger(
                flux_conn_id=self.flux_conn_id or DEFAULT_CONN_ID,
                handle=dict(handle),
                end_time=time.time() + wait,
                use_stream=self.use_stream,
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                api_logs=self.api_logs,
            ),
            method_name="execute_complete",
            # A backstop after the trigger's own deadline, so the trigger's clean timeout
            # event (which leads to a cancel) wins over a bare deferral timeout.
            timeout=timedelta(seconds=wait + 120),
        )

    def _failed(self, status: FluxStatus, handle: Mapping[str, Any]) -> FluxRequestFailedError:
        rid = handle["request_id"]
        return FluxRequestFailedError(
            f"FLUX request {rid} failed: {status.error_type or 'error'}: {status.error or 'no reason given'}",
            status_code=200,
            detail=status.error,
            error_type=status.error_type,
            request_id=rid,
        )

    def _result(self, handle: Mapping[str, Any], waited: float | None = None) -> dict[str, Any]:
        try:
            result = self.hook.get_result(handle)
        except FluxAPIError as exc:
            raise FluxRequestFailedError(
                f"FLUX request {handle['request_id']} completed but has no result: {exc}",
                status_code=exc.status_code,
                detail=exc.detail,
                error_type=exc.error_type,
                request_id=handle["request_id"],
            ) from None
        return self._return_value(result.model_dump(mode="json"), handle, waited)

    def _return_value(self, result: dict[str, Any], handle: Mapping[str, Any], waited: float | None) -> dict[str, Any]:
        # waited_seconds: time spent waiting for completion (None when it was not measured).
        result = {
            **result,
            "request_id": handle["request_id"],
            "endpoint": handle.get("endpoint"),
            "waited_seconds": waited,
        }
        self.log.info(
            "FLUX request %s completed: %d image(s), seed %s",
            handle["request_id"],
            len(result.get("images") or []),
            result.get("seed"),
        )
        return result

    def _cancel_quietly(self, handle: Mapping[str, Any]) -> None:
        try:
            outcome = self.hook.cancel(handle)
            self.log.info("Cancel of FLUX request %s: %s", handle["request_id"], outcome)
        except Exception as exc:
            self.log.warning("Could not cancel FLUX request %s: %s", handle["request_id"], exc)

    def _wait_blocking(self, handle: Mapping[str, Any]) -> dict[str, Any]:
        """Non-deferrable wait in the worker: the trigger's polling rules, with the sync hook."""
        from airflow_flux.triggers.flux import next_poll_interval

        started = time.time()
        deadline = started + self._wait_timeout()
        polls = 0
        last: str | None = None
        while True:
            status = self.hook.get_status(handle, logs=self.api_logs)
            if status.status != last:
                self.log.info("FLUX request %s is %s", handle["request_id"], status.status)
                last = status.status
            if status.is_failed:
                raise self._failed(status, handle)
            if status.is_completed:
                return self._result(handle, round(time.time() - started, 3))
            if time.time() >= deadline:
                if self.cancel_on_timeout:
                    self._cancel_quietly(handle)
                raise self._timeout_error(f"FLUX request {handle['request_id']} did not complete within the timeout.")
            delay = next_poll_interval(
                polls,
                time.time() - started,
                initial=self.poll_interval,
                maximum=self.max_poll_interval,
                queue_position=status.queue_position,
            )
            polls += 1
            time.sleep(max(0.0, min(delay, deadline - time.time())))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resume after the trigger's event: return the result or raise the API's reason."""
        handle = event["handle"]
        self._use_connection_of(handle)  # a new instance: only the event knows the request
        status = event.get("status")
        if status == "success":
            if event.get("result") is None:
                return self._result(handle, event.get("waited_seconds"))
            return self._return_value(event["result"], handle, event.get("waited_seconds"))
        if status == "timeout":
            if self.cancel_on_timeout:
                self._cancel_quietly(handle)
            raise self._timeout_error(event["message"])
        if status == "failed":
            raise FluxRequestFailedError(
                event["message"],
                status_code=event.get("status_code") or 200,
                detail=event.get("error"),
                error_type=event.get("error_type"),
                request_id=handle["request_id"],
            )
        raise FluxError(event.get("message") or f"Unexpected event from the FLUX trigger: {event}")


class FluxSubmitOperator(BaseOperator):
    """Validate a FLUX.1 Kontext [pro] request and submit it to fal's queue.

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
    :param safety_tolerance: ``"1"`` (strictest) to ``"6"``.
    :param aspect_ratio: 21:9, 16:9, 4:3, 3:2, 1:1, 2:3, 3:4, 9:16 or 9:21.
    :param enhance_prompt: let the API rewrite the prompt.
    :param sync_mode: images inline as ``data:`` URIs (large XCom; prefer the default).
    :param extra_input: more input fields, for other fal endpoints (explicit arguments win).
    :param endpoint: fal model path; defaults to the connection's (Kontext text-to-image).
    :param webhook_url: optional ``fal_webhook`` notified on completion.
    :param flux_conn_id: the ``flux`` connection.
    :param reuse_request: on an automatic retry, reuse the request an earlier try submitted
        for the same input (``ResumableJobMixin``'s ``durable``); False submits on every try.
    """

    template_fields: Sequence[str] = (*REQUEST_FIELDS, "extra_input", "endpoint", "webhook_url", "flux_conn_id")
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
        extra_input: dict[str, Any] | None = None,
        endpoint: str | None = None,
        webhook_url: str | None = None,
        flux_conn_id: str | None = DEFAULT_CONN_ID,
        reuse_request: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prompt = prompt
        self.seed = seed
        self.guidance_scale = guidance_scale
        self.num_images = num_images
        self.output_format = output_format
        self.safety_tolerance = safety_tolerance
        self.aspect_ratio = aspect_ratio
        self.enhance_prompt = enhance_prompt
        self.sync_mode = sync_mode
        self.extra_input = extra_input
        self.endpoint = endpoint
        self.webhook_url = webhook_url
        self.flux_conn_id = flux_conn_id
        self.reuse_request = reuse_request
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
        fields = {k: v for k, v in self._request_fields(known_only=True).items() if not _is_templated(v)}
        if "prompt" not in fields and self.prompt is not None:
            fields["prompt"] = "(templated)"  # checked after rendering
        try:
            build_payload(fields, endpoint or KONTEXT_TEXT_TO_IMAGE)
        except FluxValidationError as exc:
            raise FluxValidationError(f"Task {self.task_id!r}: {exc}", errors=exc.errors) from None

    @cached_property
    def hook(self) -> FluxHook:
        from airflow_flux.hooks.flux import FluxHook

        return FluxHook(flux_conn_id=self.flux_conn_id or DEFAULT_CONN_ID)

    def submit(self, context: Context) -> dict[str, Any]:
        """Submit (or reuse) the request and record it before anything else can fail."""
        endpoint = (self.endpoint or self.hook.settings.endpoint).strip("/")
        payload = build_payload(self._request_fields(), endpoint)  # rendered values, before any call
        reuse = RequestReuse(
            context,
            hook=self.hook,
            identity=RequestIdentity.of(endpoint=endpoint, payload=payload, base_url=self.hook.settings.base_url),
            log=self.log,
            enabled=self.reuse_request,
        )
        handle = reuse.reusable()
        if handle is None:
            handle = self.hook.submit(payload, endpoint=endpoint, webhook_url=self.webhook_url).model_dump()
            reuse.record(handle)
            self.log.info("Submitted FLUX request %s", handle["request_id"])
        # XCom right away: if the worker dies now, the id is still on record.
        context["ti"].xcom_push(key=LINK_XCOM_KEY, value=handle["response_url"])
        return handle

    def execute(self, context: Context) -> dict[str, Any]:
        return self.submit(context)


class FluxGenerateOperator(FluxWaitMixin, FluxSubmitOperator):
    """Submit a FLUX.1 Kontext [pro] request and wait for its result, in one task.

    The wait is deferred to the triggerer by default (no worker slot held). Returns the
    result (``images``, ``seed``, ``has_nsfw_concepts``, ``prompt``, ``timings``,
    ``request_id``) like :class:`~airflow_flux.sensors.FluxStatusSensor`. Takes every
    argument of :class:`FluxSubmitOperator`, plus:

    :param deferrable: wait in the triggerer (default) or poll in the worker.
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
        deferrable: bool = True,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        use_stream: bool = True,
        poll_interval: float = 1.0,
        max_poll_interval: float = 30.0,
        cancel_on_timeout: bool = True,
        api_logs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.deferrable = deferrable
        self.wait_timeout = wait_timeout
        self.use_stream = use_stream
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.cancel_on_timeout = cancel_on_timeout
        self.api_logs = api_logs

    def _wait_timeout(self) -> float:
        return float(self.wait_timeout)

    def execute(self, context: Context) -> dict[str, Any]:
        handle = self._handle = self.submit(context)
        if self.deferrable:
            self._defer_wait(handle)
        return self._wait_blocking(handle)

    def on_kill(self) -> None:
        # Non-deferred runs only: a deferred task is cancelled by the trigger's on_kill.
        handle = getattr(self, "_handle", None)
        if handle:
            self._cancel_quietly(handle)
