"""What the provider counts and times, through Airflow's own ``Stats`` (StatsD, Datadog or
OpenTelemetry, as ``[metrics]`` configures it; nothing when metrics are off).

Names, under Airflow's prefix (``[metrics] statsd_prefix``, ``airflow`` by default):

- ``flux.requests_completed``, ``flux.requests_failed``: counters, one per request outcome a
  task learns (a retry that keeps an earlier try's outcome does not count it again);
- ``flux.cost_usd``: counter, the completed requests' cost in US dollars (a fraction);
- ``flux.queue_time``, ``flux.generation_time``: timers (milliseconds): the wait (from the
  submit, or the start of the wait) less the generation, i.e. the time in fal's queue and in
  transit; and the API's own generation time (``timings.inference``);
- ``flux.images_copied``: counter, the images a copy wrote to S3.

Each is tagged ``endpoint`` (the fal model path; failures ``error_type`` too) where the backend
takes tags (Datadog, InfluxDB-style StatsD, OpenTelemetry); plain StatsD drops tags.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

PREFIX = "flux"


def _stats() -> Any:
    # Imported when a figure is sent, not when an operator module is: DAG files parse fast.
    from airflow.providers.common.compat.sdk import Stats

    return Stats


def _tags(endpoint: Any, **more: Any) -> dict[str, str]:
    return {"endpoint": str(endpoint or "unknown"), **{k: str(v) for k, v in more.items() if v is not None}}


def request_finished(item: Mapping[str, Any], *, waited_seconds: float | None = None) -> None:
    """Count one request's outcome: a result (``status`` absent or ``completed``) or a failed item.

    :param item: a result as the operators return it, or a batch's result line.
    :param waited_seconds: from its submit (or the start of its wait) to its completion.
    """
    stats = _stats()
    endpoint = item.get("endpoint")
    if item.get("status", "completed") != "completed":
        stats.incr(f"{PREFIX}.requests_failed", tags=_tags(endpoint, error_type=item.get("error_type") or "error"))
        return
    tags = _tags(endpoint)
    stats.incr(f"{PREFIX}.requests_completed", tags=tags)
    if item.get("cost_usd") is not None:
        stats.incr(f"{PREFIX}.cost_usd", float(item["cost_usd"]), tags=tags)
    timings = item.get("timings")
    inference = timings.get("inference") if isinstance(timings, Mapping) else None
    inference = inference if isinstance(inference, (int, float)) else None
    if inference is not None:
        stats.timing(f"{PREFIX}.generation_time", timedelta(seconds=float(inference)), tags=tags)
    waited = waited_seconds if waited_seconds is not None else item.get("waited_seconds")
    if isinstance(waited, (int, float)) and inference is not None:
        queued = max(0.0, float(waited) - float(inference))
        stats.timing(f"{PREFIX}.queue_time", timedelta(seconds=queued), tags=tags)


def images_copied(count: int, *, endpoint: str | None = None) -> None:
    """Count ``count`` images written to S3 by a copy."""
    if count:
        _stats().incr(f"{PREFIX}.images_copied", count, tags=_tags(endpoint))
