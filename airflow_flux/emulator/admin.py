"""The emulator's own admin endpoints under ``/_emulator/`` (no auth).

Health, recorded requests, jobs, scenario registration, gates and reset, for cross-process
tests and demos. A mixin on :class:`~airflow_flux.emulator.core._CoreState`; see ``app``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from airflow_flux.emulator.core import _CoreState, _json
from airflow_flux.emulator.jobs import IN_QUEUE
from airflow_flux.emulator.scenarios import Scenario

if TYPE_CHECKING:
    from aiohttp import web

    from airflow_flux.emulator.jobs import Job


class _AdminHandlers(_CoreState):
    """Handlers for ``/_emulator/{health,requests,jobs,scenarios,gates,reset}``."""

    # ---- admin

    async def admin_health(self, request: web.Request) -> web.Response:
        """Liveness probe."""
        return _json({"ok": True})

    async def admin_requests(self, request: web.Request) -> web.Response:
        """All recorded requests, oldest first."""
        with self.lock:
            rows = [dataclasses.asdict(r) for r in self.requests]
        return _json(rows)

    async def admin_jobs(self, request: web.Request) -> web.Response:
        """Summary of every job (for debugging and cross-process tests); ``started_at`` and
        ``completed_at`` give the timeline, and ``queue_position`` is there while queued."""
        now = time.time()
        with self.lock:
            jobs = list(self.jobs.values())
        return _json([_job_summary(j, now) for j in jobs])

    async def admin_scenarios(self, request: web.Request) -> web.Response:
        """Register a scenario: ``{"match": str | null, "scenario": {...}}``."""
        try:
            payload = await request.json()
            if not isinstance(payload, dict):
                raise ValueError("body must be a JSON object")
            match = payload.get("match")
            if match is not None and not isinstance(match, str):
                raise ValueError("match must be a string or null")
            scenario = Scenario.from_dict(payload.get("scenario") or {})
        except (ValueError, TypeError) as exc:
            return _json({"detail": str(exc)}, 400)
        self.add_scenario(scenario, match)
        return _json({"ok": True})

    async def admin_gate(self, request: web.Request) -> web.Response:
        """``POST /_emulator/gates/{name}/{hold,release}``: close a gate for later submits, or
        release the jobs it holds (``{"released": n}``, how many it held)."""
        name, action = request.match_info["name"], request.match_info["action"]
        if action == "hold":
            self.hold_gate(name)
            return _json({"ok": True})
        return _json({"ok": True, "released": self.release_gate(name)})

    async def admin_reset(self, request: web.Request) -> web.Response:
        """Forget jobs, scenarios and recorded requests."""
        self.reset()
        return _json({"ok": True})


def _strip_url(url: Any) -> Any:
    """A URL without its query string or fragment (signed URLs carry secrets there);
    ``data:`` URIs are cut to their header. Anything that is not a string is left alone."""
    if not isinstance(url, str):
        return url
    if url.lower().startswith("data:"):
        header = url.partition(",")[0]
        return f"{header},…({len(url)} chars)"
    return url.split("#", 1)[0].split("?", 1)[0]


def _started_at(job: Job, now: float) -> float | None:
    """When the job left the queue and began to run (None: not yet, or it never ran)."""
    start = job.queue_end
    return start if start is not None and start <= now and job.started else None


def _job_summary(job: Job, now: float) -> dict[str, Any]:
    body = dict(job.input)
    for name in ("image_url", "image_urls"):
        if name in body:
            value = body[name]
            body[name] = [_strip_url(u) for u in value] if isinstance(value, list) else _strip_url(value)
    fetches = []
    for fetch in job.input_fetches:
        row = dataclasses.asdict(fetch)
        row["url"] = _strip_url(fetch.url)
        fetches.append(row)
    state = job.state_at(now)
    return {
        "request_id": job.request_id,
        "model_path": job.model_path,
        "status": state,
        "queue_position": job.queue_position_at(now) if state == IN_QUEUE else None,
        "held_at": job.held_at(now),
        "outcome": job.outcome if job.completed_at is not None else None,
        "submitted_at": job.submitted_at,
        "started_at": _started_at(job, now),
        "completed_at": job.completed_at,
        "cancelled": job.cancelled,
        "input": body,
        "priority": job.priority,
        "request_timeout": job.request_timeout,
        "store_io": job.store_io,
        "object_lifecycle_preference": job.object_lifecycle_preference,
        "input_fetches": fetches,
    }
