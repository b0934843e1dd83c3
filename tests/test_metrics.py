"""The metrics the provider sends, through Airflow's ``Stats``, to a real StatsD listener.

Airflow's own StatsD logger (the one ``[metrics] statsd_on`` makes) is pointed at a UDP
listener in a thread; a real run on a real scheduler, with every task process sending, is
``tests/system/test_real_airflow.py::test_lineage_and_metrics_of_an_edit_its_copy_and_a_batch``.
"""

from __future__ import annotations

import time

import pytest

from airflow_flux import metrics
from tests.helpers import StatsdListener


@pytest.fixture
def statsd(monkeypatch):
    statsd = pytest.importorskip("statsd")
    from airflow.sdk._shared.observability.metrics import stats
    from airflow.sdk._shared.observability.metrics.statsd_logger import get_statsd_logger

    listener = StatsdListener()
    backend = get_statsd_logger(stats_class=statsd.StatsClient, host="127.0.0.1", port=listener.port, prefix="airflow")
    monkeypatch.setattr(stats, "_backend", backend)
    yield listener
    listener.close()


def _wait(listener: StatsdListener, name: str, count: int) -> list[tuple[float, str]]:
    deadline = time.monotonic() + 10
    while len(values := listener.values(name)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return values


def test_a_completed_request_is_counted_priced_and_timed(statsd):
    metrics.request_finished(
        {"endpoint": "fal-ai/flux-2-pro", "cost_usd": 0.045, "timings": {"inference": 1.5}, "images": [{}]},
        waited_seconds=4.0,
    )
    assert _wait(statsd, "airflow.flux.requests_completed", 1) == [(1.0, "c")]
    assert _wait(statsd, "airflow.flux.cost_usd", 1) == [(0.045, "c")]
    assert _wait(statsd, "airflow.flux.generation_time", 1) == [(1500.0, "ms")]
    assert _wait(statsd, "airflow.flux.queue_time", 1) == [(2500.0, "ms")]


def test_a_failure_is_counted_and_nothing_else(statsd):
    metrics.request_finished({"endpoint": "e", "status": "failed", "error_type": "content_policy_violation"})
    metrics.images_copied(3, endpoint="e")
    assert _wait(statsd, "airflow.flux.requests_failed", 1) == [(1.0, "c")]
    assert _wait(statsd, "airflow.flux.images_copied", 1) == [(3.0, "c")]
    assert statsd.values("airflow.flux.requests_completed") == []
    assert statsd.values("airflow.flux.cost_usd") == []


def test_unknown_cost_and_timings_send_no_figure(statsd):
    metrics.request_finished({"endpoint": "e", "cost_usd": None, "timings": {}}, waited_seconds=3.0)
    metrics.images_copied(0)
    assert _wait(statsd, "airflow.flux.requests_completed", 1) == [(1.0, "c")]
    for name in ("cost_usd", "generation_time", "queue_time", "images_copied"):
        assert statsd.values(f"airflow.flux.{name}") == [], name


def test_tags_reach_a_backend_that_takes_them(monkeypatch):
    sent = []

    class Recorder:
        def incr(self, stat, count=None, rate=None, *, tags=None):
            sent.append((stat, count, tags))

        def timing(self, stat, dt, *, tags=None):
            sent.append((stat, dt.total_seconds(), tags))

    monkeypatch.setattr(metrics, "_stats", Recorder)
    metrics.request_finished({"endpoint": "fal-ai/flux-pro/kontext", "status": "failed", "error_type": "x"})
    metrics.request_finished({"endpoint": "fal-ai/flux-pro/kontext", "cost_usd": 0.04, "timings": {"inference": 2}})
    assert sent[0] == ("flux.requests_failed", None, {"endpoint": "fal-ai/flux-pro/kontext", "error_type": "x"})
    assert ("flux.cost_usd", 0.04, {"endpoint": "fal-ai/flux-pro/kontext"}) in sent
    assert ("flux.generation_time", 2.0, {"endpoint": "fal-ai/flux-pro/kontext"}) in sent
