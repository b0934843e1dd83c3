"""RetryPolicy.call/acall: tenacity only after a retryable failure, same accounting."""

from __future__ import annotations

import logging

import pytest
import tenacity

from airflow_flux.exceptions import FluxAPIError
from airflow_flux.hooks.retry import DEFAULT_RETRY_POLICY, RetryPolicy

POLICY = RetryPolicy(max_attempts=3, initial_wait=0.001, max_wait=0.002, max_total=5)


def _flaky(failures: list[BaseException], calls: list[int]):
    def fn() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return "ok"

    return fn


def _transient() -> FluxAPIError:
    return FluxAPIError("busy", status_code=503, retryable=True)


def test_a_first_success_builds_no_controller(monkeypatch):
    monkeypatch.setattr(tenacity, "Retrying", None)  # would fail if used
    monkeypatch.setattr(tenacity, "AsyncRetrying", None)
    calls: list[int] = []
    assert POLICY.call(_flaky([], calls)) == "ok"
    assert calls == [1]


def test_retryable_failures_are_retried_with_the_same_attempt_budget(caplog):
    caplog.set_level(logging.WARNING)
    calls: list[int] = []
    assert POLICY.call(_flaky([_transient(), _transient()], calls)) == "ok"
    assert len(calls) == 3
    assert "attempt 2 of 3" in caplog.text and "attempt 3 of 3" in caplog.text

    calls.clear()
    with pytest.raises(FluxAPIError, match="busy"):
        POLICY.call(_flaky([_transient() for _ in range(5)], calls))
    assert len(calls) == 3, "max_attempts counts the plain first attempt"


def test_final_errors_are_not_retried():
    calls: list[int] = []
    final = FluxAPIError("bad input", status_code=422)
    with pytest.raises(FluxAPIError, match="bad input"):
        POLICY.call(_flaky([final], calls))
    with pytest.raises(ValueError, match="not an API error"):
        POLICY.call(_flaky([ValueError("not an API error")], calls))
    assert len(calls) == 2


async def test_async_twin_has_the_same_rules():
    calls: list[int] = []

    async def fn() -> str:
        return _flaky_sync()

    failures: list[BaseException] = [_transient(), _transient(), FluxAPIError("gone", status_code=404)]
    _flaky_sync = _flaky(failures, calls)
    with pytest.raises(FluxAPIError, match="gone"):
        await POLICY.acall(fn)
    assert len(calls) == 3
    calls.clear()
    assert await POLICY.acall(fn) == "ok"
    assert calls == [1]


def test_time_spent_in_the_first_attempt_counts_against_max_total():
    controller = POLICY.retrying(spent=4.999)
    calls: list[int] = []
    with pytest.raises(FluxAPIError):
        controller(_flaky([_transient(), _transient()], calls))
    assert len(calls) == 1, "no new attempt may start after max_total"
    assert RetryPolicy() == DEFAULT_RETRY_POLICY
