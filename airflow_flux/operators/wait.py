"""Waiting for a submitted request: shared by the sensor and the generate operator.

Deferrable by default: the wait runs in the triggerer (:class:`FluxStatusTrigger`), and
the resumed task reads everything from the trigger's typed event
(:class:`~airflow_flux.events.FluxWaitEvent`), since it is a new instance. Without a
triggerer, the worker polls with the hook's :meth:`~airflow_flux.hooks.FluxHook.wait_for_completion`
(the same schedule).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk.bases.operator import BaseOperatorMeta

from airflow_flux.exceptions import FluxAPIError, FluxRequestFailedError, FluxTimeoutError
from airflow_flux.identity import DEFAULT_CONN_ID, conn_id_for
from airflow_flux.lineage import FluxLineage, FluxLineageMixin
from airflow_flux.metrics import request_finished
from airflow_flux.models import cost_usd

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow.sdk import BaseOperator, Context

    from airflow_flux.hooks.flux import FluxHook
    from airflow_flux.models import FluxStatus

    _Operator = BaseOperator
else:
    _Operator = object

DEFAULT_WAIT_TIMEOUT = 60 * 60.0


def default_deferrable() -> bool:
    """``[operators] default_deferrable`` when the deployment sets it, else True.

    Airflow's own default for that option is False (deferring is optional for most
    operators), and it is written into every generated ``airflow.cfg``, so only a True
    value there, or the option set in the environment, is read as the deployment's choice.
    A FLUX wait should not hold a worker slot for minutes unless asked to.
    """
    from airflow.providers.common.compat.sdk import conf

    explicit = "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE" in os.environ
    value = conf.getboolean("operators", "default_deferrable", fallback=True)
    return value if explicit or value else True


class FluxWaitMixin(FluxLineageMixin, _Operator):
    """The wait of a FLUX request: deferred to the triggerer, or polled from the worker.

    Takes the wait's own arguments (as ``ResumableJobMixin`` takes ``durable``) and passes the
    rest on; subclasses say how long a wait may take (:meth:`_wait_timeout`) and what a
    timeout raises (:meth:`_timeout_error`).

    :param deferrable: wait in the triggerer, or poll from the worker; default from
        ``[operators] default_deferrable`` when the deployment sets it, else True.
    :param use_stream: follow the SSE status stream when available.
    :param poll_interval: first polling interval (polling fallback), seconds.
    :param max_poll_interval: cap of the polling interval, seconds.
    :param cancel_on_timeout: cancel the remote request when the wait times out.
    :param api_logs: ask the API for its log lines while waiting and print them in the task
        log; False makes each status smaller (cheaper for thousands of waits per triggerer).
    """

    flux_conn_id: str | None

    # The mixin is not a BaseOperator at run time, so the metaclass does not wrap this
    # __init__: wrapping it here lets default_args reach these arguments too.
    @BaseOperatorMeta._apply_defaults  # type: ignore[type-var]
    def __init__(
        self,
        *,
        deferrable: bool = default_deferrable(),
        use_stream: bool = True,
        poll_interval: float = 1.0,
        max_poll_interval: float = 30.0,
        cancel_on_timeout: bool = True,
        api_logs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.deferrable = deferrable
        self.use_stream = use_stream
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.cancel_on_timeout = cancel_on_timeout
        self.api_logs = api_logs

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
        return FluxTimeoutError(message)

    def _defer_wait(self, handle: Mapping[str, Any]) -> None:
        from airflow_flux.triggers.flux import FluxStatusTrigger

        wait = self._wait_timeout()
        self.defer(
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
        self._count_failure(handle, status.error_type)
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
            self._count_failure(handle, exc.error_type)
            raise FluxRequestFailedError(
                f"FLUX request {handle['request_id']} completed but has no result: {exc}",
                status_code=exc.status_code,
                detail=exc.detail,
                error_type=exc.error_type,
                request_id=handle["request_id"],
            ) from None
        return self._return_value(result.model_dump(mode="json"), handle, waited)

    def _count_failure(self, handle: Mapping[str, Any], error_type: str | None) -> None:
        """A request that failed: counted once, and named in this try's lineage (it was paid for)."""
        failed = {**handle, "status": "failed", "error_type": error_type}
        request_finished(failed)
        self.flux_lineage = FluxLineage.of(failed)

    def _return_value(
        self, result: dict[str, Any], handle: Mapping[str, Any], waited: float | None, *, fresh: bool = True
    ) -> dict[str, Any]:
        """The task's return value of a completed request (its cost added), counted in the metrics
        unless ``fresh`` is False (an earlier try's kept result), and kept as this try's lineage."""
        images = len(result.get("images") or [])
        cost = cost_usd(
            handle.get("endpoint"),
            result.get("images") or [],
            billable_units=result.get("billable_units"),
            prices=self.hook.settings.prices,
        )
        # waited_seconds: time spent waiting for completion (None when it was not measured).
        result = {
            **result,
            "request_id": handle["request_id"],
            "endpoint": handle.get("endpoint"),
            "inputs": handle.get("inputs"),
            "cost_usd": cost,
            "waited_seconds": waited,
            # The copy to S3 downloads the images under this connection's allowed hosts.
            "flux_conn_id": self.flux_conn_id or DEFAULT_CONN_ID,
        }
        self.log.info(
            "FLUX request %s completed: %d image(s), seed %s, cost %s",
            handle["request_id"],
            images,
            result.get("seed"),
            "unknown (no price for this endpoint, or an image's size missing)" if cost is None else f"${cost:.4f}",
        )
        if fresh:
            request_finished(result)
        self.flux_lineage = FluxLineage.of(result)
        return result

    def _cancel_quietly(self, handle: Mapping[str, Any]) -> None:
        try:
            outcome = self.hook.cancel(handle)
            self.log.info("Cancel of FLUX request %s: %s", handle["request_id"], outcome)
        except Exception as exc:
            self.log.warning("Could not cancel FLUX request %s: %s", handle["request_id"], exc)

    def _wait_blocking(self, handle: Mapping[str, Any]) -> dict[str, Any]:
        """Non-deferrable wait in the worker: the trigger's polling rules, with the sync hook."""
        rid = handle["request_id"]
        last: list[str | None] = [None]

        def progress(status: FluxStatus) -> None:
            if status.status != last[0]:
                self.log.info("FLUX request %s is %s", rid, status.status)
                last[0] = status.status

        started = time.time()
        try:
            status = self.hook.wait_for_completion(
                handle,
                timeout=self._wait_timeout(),
                poll_interval=self.poll_interval,
                max_poll_interval=self.max_poll_interval,
                logs=self.api_logs,
                on_status=progress,
            )
        except FluxTimeoutError as exc:
            if self.cancel_on_timeout:
                self._cancel_quietly(handle)
            raise self._timeout_error(str(exc)) from None
        if status.is_failed:
            raise self._failed(status, handle)
        return self._result(handle, round(time.time() - started, 3))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> dict[str, Any]:
        """Resume after the trigger's event: return the result or raise the API's reason."""
        # Imported here, not at the top: a DAG parse imports this module and never resumes.
        from airflow_flux.events import FluxWaitEvent

        wait = FluxWaitEvent.from_payload(event)
        handle = wait.handle
        self._use_connection_of(handle)  # a new instance: only the event knows the request
        if wait.status == "success":
            if wait.result is None:
                return self._result(handle, wait.waited_seconds)
            return self._return_value(wait.result, handle, wait.waited_seconds)
        if wait.status == "timeout":
            if self.cancel_on_timeout:
                self._cancel_quietly(handle)
            raise self._timeout_error(wait.message)
        if wait.status == "failed":  # the API's refusal; an "error" is the wait giving up, not an outcome
            self._count_failure(handle, wait.error_type)
        raise wait.failure()
