"""The event a :class:`~airflow_flux.triggers.FluxStatusTrigger` yields, typed once for both sides.

The trigger builds it, Airflow stores its payload (JSON) with the task instance, and the
resumed task (a new instance) reads it back in ``execute_complete``. One model for both, so
a field renamed on one side fails loudly on the other; like the OpenAI provider's
``validate_execute_complete_event``, a payload that is not such an event is refused with a
clear error instead of a ``KeyError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from airflow_flux.exceptions import FluxError, FluxRequestFailedError, FluxTimeoutError

if TYPE_CHECKING:
    from typing_extensions import Self

WaitStatus = Literal["success", "failed", "timeout", "error"]


class _Event(BaseModel):
    """A trigger's event: built by the trigger, read back by ``execute_complete``."""

    model_config = ConfigDict(extra="forbid", defer_build=True)

    @classmethod
    def from_payload(cls, event: Any) -> Self:
        """The event of a payload Airflow hands ``execute_complete``, or a clear :class:`FluxError`."""
        try:
            return cls.model_validate(event)
        except ValidationError as exc:
            raise FluxError(
                f"Unexpected event from the FLUX trigger ({exc.error_count()} problem(s): "
                f"{exc.errors(include_url=False, include_input=False)}): {str(event)[:500]}"
            ) from None


class FluxWaitEvent(_Event):
    """The end of a wait.

    :param status: ``success`` (with ``result`` when it was fetched), ``failed`` (the API's
        reason), ``timeout`` (the trigger's deadline passed) or ``error`` (the wait gave up).
    :param message: one line for the task log and the task's error.
    :param request_id: the request waited on.
    :param handle: its handle (secret-free), for the resumed task's calls.
    :param waited_seconds: from the start of the wait to this event.
    :param result: the result JSON (``success`` with ``fetch_result``).
    :param metrics: the API's ``metrics`` of the final status.
    :param error: the API's reason (``failed``).
    :param error_type: fal's ``error_type``.
    :param status_code: the HTTP status behind a ``failed`` or ``error`` event.
    :param detail: the API's ``detail`` behind an ``error`` event.
    """

    status: WaitStatus
    message: str
    request_id: str
    handle: dict[str, Any]
    waited_seconds: float | None = None
    result: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    status_code: int | None = None
    detail: str | None = None

    @classmethod
    def of(cls, **fields: Any) -> FluxWaitEvent:
        """The trigger's event, built without validation: the trigger is its only producer, and
        ``execute_complete`` validates what it reads (:meth:`from_payload`). Thousands of
        waits completing in one second each build one."""
        return cls.model_construct(**fields)

    def payload(self) -> dict[str, Any]:
        """The JSON payload of the ``TriggerEvent``: only the fields this event sets, not copied
        (they are JSON already: the handle, the result's JSON dump, the API's metrics)."""
        return {name: getattr(self, name) for name in self.model_fields_set}

    def failure(self) -> FluxError:
        """The task's error for a ``failed``, ``timeout`` or ``error`` event."""
        if self.status == "failed":
            return FluxRequestFailedError(
                self.message,
                status_code=self.status_code or 200,
                detail=self.error,
                error_type=self.error_type,
                request_id=self.request_id,
            )
        if self.status == "timeout":
            return FluxTimeoutError(self.message)
        return FluxError(self.message)


class BatchOutcome(BaseModel):
    """What became of one request of a batch.

    :param index: its position in the batch's input.
    :param request_id: fal's id.
    :param status: ``completed`` (with ``result``), ``failed`` (the API's reason) or
        ``pending`` (not finished at the deadline, or out of touch: a retry waits again).
    :param result: the compact result (images, seed, NSFW flags, timings).
    :param error: the API's reason, or why the wait lost touch.
    :param error_type: fal's ``error_type``.
    :param status_code: the HTTP status behind a failure.
    :param retryable: whether paying for it again can succeed (an infrastructure failure)
        rather than meet the same refusal (422 validation or content policy).
    :param waited_seconds: from the start of its wait (its submit, in a window) to its outcome.
    """

    model_config = ConfigDict(extra="forbid", defer_build=True)

    index: int
    request_id: str
    status: Literal["completed", "failed", "pending"]
    result: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    status_code: int | None = None
    retryable: bool | None = None
    waited_seconds: float | None = None


class FluxBatchEvent(_Event):
    """The end of a batch's wait: every request's outcome, in input order.

    :param status: ``done`` (every request completed or failed) or ``timeout`` (the deadline
        passed; the unfinished are ``pending``).
    """

    status: Literal["done", "timeout"]
    message: str
    outcomes: list[BatchOutcome]
    waited_seconds: float | None = None

    def payload(self) -> dict[str, Any]:
        """The JSON payload of the ``TriggerEvent`` (unset fields left out: it is stored per task)."""
        return self.model_dump(mode="json", exclude_none=True)
