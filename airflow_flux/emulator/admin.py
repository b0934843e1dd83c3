"""The emulator's own admin endpoints under ``/_emulator/`` (no auth).

Health, recorded requests, jobs, scenario registration and reset, for cross-process tests
and demos. A mixin on :class:`~airflow_flux.emulator.core._CoreState`; see ``app``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from airflow_flux.emulator.core import _CoreState, _json
from airflow_flux.emulator.scenarios import Scenario

if TYPE_CHECKING:
    from aiohttp import web


class _AdminHandlers(_CoreState):
    """Handlers for ``/_emulator/{health,requests,jobs,scenarios,reset}``."""

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
        """Summary of every job (for debugging and cross-process tests)."""
        now = time.time()
        with self.lock:
            jobs = list(self.jobs.values())
        return _json(
            [
                {
                    "request_id": j.request_id,
                    "model_path": j.model_path,
                    "status": j.state_at(now),
                    "submitted_at": j.submitted_at,
                    "completed_at": j.completed_at,
                    "cancelled": j.cancelled,
                    "input": j.input,
                }
                for j in jobs
            ]
        )

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

    async def admin_reset(self, request: web.Request) -> web.Response:
        """Forget jobs, scenarios and recorded requests."""
        self.reset()
        return _json({"ok": True})
