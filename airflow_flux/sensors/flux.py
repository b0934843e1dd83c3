"""FluxStatusSensor: waits for a submitted FLUX request, deferred to the triggerer by default."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, PokeReturnValue

from airflow_flux.identity import coerce_handle
from airflow_flux.links import FluxGalleryLink, FluxRequestLink
from airflow_flux.operators.wait import DEFAULT_WAIT_TIMEOUT, FluxWaitMixin
from airflow_flux.xcom_keys import LINK_XCOM_KEY

if TYPE_CHECKING:
    from collections.abc import Sequence

    from airflow.sdk import Context


class FluxStatusSensor(FluxWaitMixin, BaseSensorOperator):
    """Wait until a FLUX request completes and return its result.

    Checks once in the worker (a request may already be done), then defers: the wait runs
    in the triggerer (SSE stream, or polling when the API has none) and holds no worker
    slot. ``timeout`` is enforced while deferred; on timeout the remote request is
    cancelled (``cancel_on_timeout``) and the task fails, or is skipped with ``soft_fail``.

    Returns the result as XCom: ``images`` (url, width, height, content_type), ``seed``,
    ``has_nsfw_concepts``, ``prompt``, ``timings``, ``request_id``, ``endpoint``.

    :param request: the submit task's output (``request=submit.output``), or a dict with
        ``request_id`` and the URLs, or a bare request id.
    :param flux_conn_id: the ``flux`` connection; by default the one the request was submitted
        with (recorded in the handle), else ``flux_default``. One that differs from the
        handle's wins, with a warning.
    :param deferrable: wait in the triggerer or poke from the worker; default from
        ``[operators] default_deferrable`` when the deployment sets it, else True.
    :param use_stream: follow the SSE status stream when available.
    :param poll_interval: first polling interval of the polling fallback, seconds.
    :param max_poll_interval: cap of the polling interval, seconds.
    :param cancel_on_timeout: cancel the remote request when the wait times out.
    :param api_logs: ask the API for its log lines while waiting and print them in the task
        log; False makes each status smaller (cheaper for thousands of waits per triggerer).
    """

    template_fields: Sequence[str] = ("request", "flux_conn_id")
    operator_extra_links = (FluxRequestLink(), FluxGalleryLink())
    ui_color = "#efe7fb"

    def __init__(
        self,
        *,
        request: Any,
        flux_conn_id: str | None = None,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", 5.0)
        super().__init__(timeout=timeout, **kwargs)
        self.request = request
        self.flux_conn_id = flux_conn_id

    def _wait_timeout(self) -> float:
        return float(self.timeout)

    def _timeout_error(self, message: str) -> BaseException:
        from airflow.providers.common.compat.sdk import AirflowSensorTimeout

        # resume_execution turns this into a skip when soft_fail is set.
        return AirflowSensorTimeout(message)

    @property
    def handle(self) -> dict[str, Any]:
        handle = coerce_handle(self.request)
        self._use_connection_of(handle)
        return self.hook.resolve_handle(handle).model_dump()

    def poke(self, context: Context) -> PokeReturnValue:
        handle = self.handle
        status = self.hook.get_status(handle)
        self.log.info("FLUX request %s is %s", handle["request_id"], status.status)
        if status.is_failed:
            raise self._failed(status, handle)
        if status.is_completed:
            return PokeReturnValue(is_done=True, xcom_value=self._result(handle))
        return PokeReturnValue(is_done=False)

    def execute(self, context: Context) -> Any:
        handle = self.handle
        context["ti"].xcom_push(key=LINK_XCOM_KEY, value=handle.get("response_url", ""))
        if not self.deferrable:
            from airflow.providers.common.compat.sdk import AirflowSensorTimeout, AirflowSkipException

            try:
                return super().execute(context)
            except (AirflowSensorTimeout, AirflowSkipException):
                # Poke mode timed out (or soft-failed on it): stop paying for the request.
                if self.cancel_on_timeout:
                    self._cancel_quietly(handle)
                raise
        # One synchronous look first: a request that is already done needs no deferral.
        first = self.poke(context)
        if first.is_done:
            result = first.xcom_value
            if isinstance(result, dict):
                result["waited_seconds"] = 0.0  # already done: no wait at all
            return result
        self._defer_wait(handle)
        return None  # not reached: defer() raises
