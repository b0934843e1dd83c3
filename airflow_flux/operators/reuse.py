"""Whether a try reuses the request an earlier try paid for, or submits a new one.

The decision reads like Airflow's own :class:`airflow.sdk.ResumableJobMixin` (which cannot
decide for a deferrable operator yet, apache/airflow#71485): the same decisions, log lines,
``resumable_job.*`` metrics and ``resumable_job.resume_decision`` span. Two rules are this
provider's, because a reused request must be the very request this try would send:

- the stored request's fingerprint (:class:`~airflow_flux.identity.RequestIdentity`) must equal
  this try's, else the input changed (a template rendered differently, a mapped list changed
  order, a Variable was fixed) and the try submits anew;
- it must have been submitted in this run of the task: an automatic retry keeps the task
  instance's ``max_tries``, a user's clear raises it, and a clear means "run it again".

======================  ==================================================  ===========
decision                when                                                 metric
======================  ==================================================  ===========
``fresh_submit``        nothing stored (first try), or reuse is off          fresh_submit
``reconnect``           same request, still queued or running                reconnect_success
``already_succeeded``   same request, completed without error                already_succeeded
``terminal_resubmit``   same request, failed for a transient reason          terminal_resubmit
``final_failure``       same request, refused for good: the try fails        final_failure
``input_changed``       the stored request is for a different input          fresh_submit
``cleared``             the stored request is from before a clear            fresh_submit
``no_fingerprint``      the stored entry has no fingerprint (older version)  fresh_submit
======================  ==================================================  ===========

``reconnect_attempt`` counts the stored requests whose status was looked up; every
``fresh_submit`` carries a ``reason`` tag (the decision).

Whether a failed request is paid for again is :func:`~airflow_flux.hooks.retry.worth_resubmitting`'s
answer, the batch's too: a final refusal (422 validation or content policy, which fal may
bill; 401/403) fails the try with the API's reason instead of paying again; a clear still
starts fresh. Once a wait ends, its outcome (the compact result, or the failure) is kept
with the record (:func:`record_outcome`), so a retry after fal dropped the result (it keeps
one for an hour) still returns it without a call, and a known final failure is not even
looked up again.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

from airflow_flux.exceptions import FluxAPIError, FluxRequestFailedError
from airflow_flux.hooks.retry import worth_resubmitting
from airflow_flux.identity import STATE_KEY, RequestIdentity, StoredRequest
from airflow_flux.state import task_state

if TYPE_CHECKING:
    from collections.abc import Mapping

    from airflow.sdk import Context

    from airflow_flux.hooks.flux import FluxHook


class Decision(str, Enum):
    """What a try does with the request stored by an earlier one."""

    FRESH_SUBMIT = "fresh_submit"
    RECONNECT = "reconnect"
    ALREADY_SUCCEEDED = "already_succeeded"
    TERMINAL_RESUBMIT = "terminal_resubmit"
    FINAL_FAILURE = "final_failure"
    INPUT_CHANGED = "input_changed"
    CLEARED = "cleared"
    NO_FINGERPRINT = "no_fingerprint"


_METRIC = {
    Decision.RECONNECT: "reconnect_success",
    Decision.ALREADY_SUCCEEDED: "already_succeeded",
    Decision.TERMINAL_RESUBMIT: "terminal_resubmit",
    Decision.FINAL_FAILURE: "final_failure",
}


class RequestReuse:
    """The reuse decision of one try, and the record its submit leaves for the next.

    :param context: the task's context (``task_state_store``, ``ti``).
    :param hook: the hook that would submit (its connection checks the stored request).
    :param identity: the fingerprint of the request this try would submit.
    :param log: the task's logger.
    :param enabled: the operator's ``reuse_request``; when off, every try submits anew (and
        still records what it submitted).
    :param key: the ``task_state_store`` key.
    """

    def __init__(
        self,
        context: Context,
        *,
        hook: FluxHook,
        identity: RequestIdentity,
        log: Any,
        enabled: bool = True,
        key: str = STATE_KEY,
    ) -> None:
        self.store = task_state(context)
        self.ti = context.get("ti")
        self.hook = hook
        self.identity = identity
        self.log = log
        self.enabled = enabled
        self.key = key
        task = getattr(self.ti, "task", None)
        self.tags = {"operator": type(task).__name__ if task is not None else "unknown"}
        #: The decision of :meth:`reusable`, once made.
        self.decision: Decision | None = None
        #: The result kept with the record (``already_succeeded`` without a call), if any.
        self.result: dict[str, Any] | None = None
        self._failure: FluxAPIError | None = None

    @property
    def _max_tries(self) -> int | None:
        value = getattr(self.ti, "max_tries", None)
        return value if isinstance(value, int) else None

    def reusable(self) -> dict[str, Any] | None:
        """The handle to reuse, or None to submit anew; logs and counts the decision.

        Raises the API's reason when the stored request was refused for good
        (``final_failure``): paying again would meet the same refusal.
        """
        from opentelemetry import trace

        with trace.get_tracer(__name__).start_as_current_span("resumable_job.resume_decision") as span:
            span.set_attribute("operator", self.tags["operator"])
            span.set_attribute("resumable.external_id_key", self.key)
            decision, handle = self._decide(span)
            span.set_attribute("resumable.decision", decision.value)
        self.decision = decision
        if decision in _METRIC:
            self._incr(_METRIC[decision])
        if self._failure is not None:
            raise self._failure
        if handle is None:
            self._incr("fresh_submit", reason=decision.value)
        return handle

    def eligible(self) -> tuple[Decision, StoredRequest | None]:
        """The stored request when this try may reuse it (same input, same run of the task).

        Otherwise None, and why (logged): nothing stored, no fingerprint, another input, a
        clear since. The request's own state is not looked at here (see :meth:`reusable`).
        """
        if self.store is None:
            self.log.warning("No task state store in this context, crash recovery is disabled for this run")
            return Decision.FRESH_SUBMIT, None
        raw = self.store.get(self.key)
        if not raw or not self.enabled:
            return Decision.FRESH_SUBMIT, None
        stored = StoredRequest.load(raw)
        if stored is None:
            rid = raw.get("request_id") if isinstance(raw, dict) else None
            self.log.warning(
                "Stored FLUX request %s has no request fingerprint (written by an older airflow-flux), so it "
                "cannot be shown to be this try's request; submitting fresh",
                rid,
            )
            return Decision.NO_FINGERPRINT, None
        rid = stored.handle.get("request_id")
        if stored.identity.fingerprint != self.identity.fingerprint:
            differ = ", ".join(self.identity.differing_fields(stored.identity)) or "fingerprint"
            self.log.warning(
                "Stored FLUX request %s (try %s) is for a different input (%s differ); submitting fresh",
                rid,
                stored.try_number,
                differ,
            )
            return Decision.INPUT_CHANGED, None
        current = self._max_tries
        if stored.max_tries is not None and current is not None and stored.max_tries != current:
            self.log.warning(
                "Stored FLUX request %s was submitted before this task was cleared (max_tries %s, now %s): "
                "a clear runs the task again; submitting fresh",
                rid,
                stored.max_tries,
                current,
            )
            return Decision.CLEARED, None
        return Decision.RECONNECT, stored

    def _decide(self, span: Any) -> tuple[Decision, dict[str, Any] | None]:
        decision, stored = self.eligible()
        if stored is None:
            return decision, None
        rid = stored.handle.get("request_id")
        span.set_attribute("resumable.external_id", str(rid))
        kept = stored.outcome or {}
        if kept.get("status") == "completed" and isinstance(kept.get("result"), dict):
            self.log.info(
                "FLUX request %s of try %s already completed; its result was kept: no new charge, no call",
                rid,
                stored.try_number,
            )
            self.result = dict(kept["result"])
            return Decision.ALREADY_SUCCEEDED, dict(stored.handle)
        if kept.get("status") == "failed":
            return self._after_failure(stored, kept.get("error"), kept.get("error_type"), kept.get("status_code"))
        self._incr("reconnect_attempt")
        try:
            status = self.hook.get_status(stored.handle, logs=False)
        except FluxAPIError as exc:
            if exc.retryable:
                # The API is unreachable or overloaded: the request may be fine. Failing this try
                # (its retry asks again) is cheaper than paying for the image twice.
                raise
            return self._after_failure(stored, exc.detail or str(exc), exc.error_type, exc.status_code)
        span.set_attribute("resumable.prior_status", status.status)
        if status.is_failed:
            return self._after_failure(stored, status.error, status.error_type, 200)
        if status.is_completed:
            self.log.info(
                "FLUX request %s of try %s already completed successfully, skipping resubmission: no new charge",
                rid,
                stored.try_number,
            )
            return Decision.ALREADY_SUCCEEDED, dict(stored.handle)
        self.log.info(
            "Reconnecting to existing FLUX request %s of try %s (%s): no new charge",
            rid,
            stored.try_number,
            status.status,
        )
        return Decision.RECONNECT, dict(stored.handle)

    def _after_failure(
        self, stored: StoredRequest, error: str | None, error_type: str | None, status_code: int | None
    ) -> tuple[Decision, dict[str, Any] | None]:
        """Resubmit after a transient failure; after a final one, fail the try with the API's reason."""
        rid = stored.handle.get("request_id")
        reason = f"{error_type or 'error'}: {error or 'no reason given'}"
        if worth_resubmitting(status_code=status_code, error_type=error_type):
            self.log.warning(
                "Prior FLUX request %s failed for a transient reason (%s), resubmitting fresh", rid, reason
            )
            return Decision.TERMINAL_RESUBMIT, None
        self._failure = FluxRequestFailedError(
            f"FLUX request {rid} (try {stored.try_number}) was refused for good ({reason}, HTTP {status_code}); "
            "a retry does not pay for it again. Fix the input, or clear the task to submit anew.",
            status_code=status_code or 200,
            detail=error,
            error_type=error_type,
            request_id=str(rid),
        )
        return Decision.FINAL_FAILURE, None

    def record(self, handle: dict[str, Any], outcome: dict[str, Any] | None = None) -> StoredRequest:
        """Store ``handle`` with this try's fingerprint, right after the submit that paid for it.

        :param outcome: what became of it, once known (a batch keeps each request's result).
        """
        stored = StoredRequest(
            handle=handle,
            identity=self.identity,
            max_tries=self._max_tries,
            try_number=getattr(self.ti, "try_number", None),
            outcome=outcome,
        )
        if self.store is not None:
            self.store.set(self.key, stored.model_dump(mode="json"))
        return stored

    def _incr(self, metric: str, **tags: str) -> None:
        from airflow.providers.common.compat.sdk import Stats

        Stats.incr(f"resumable_job.{metric}", tags={**self.tags, **tags})


def record_outcome(
    context: Context, handle: Mapping[str, Any], outcome: dict[str, Any], *, key: str = STATE_KEY
) -> bool:
    """Keep what became of the recorded request ``handle`` with its record, for a later try.

    :param context: the task's context (``task_state_store``).
    :param handle: the request whose wait ended.
    :param outcome: ``{"status": "completed", "result": {...}}``, or ``{"status": "failed",
        "error", "error_type", "status_code"}``.
    :param key: the ``task_state_store`` key of the record.
    :returns: whether it was kept (a record of this very request exists).
    """
    store = task_state(context)
    if store is None:
        return False
    stored = StoredRequest.load(store.get(key))
    if stored is None or stored.handle.get("request_id") != handle.get("request_id"):
        return False
    store.set(key, stored.model_copy(update={"outcome": outcome}).model_dump(mode="json"))
    return True
