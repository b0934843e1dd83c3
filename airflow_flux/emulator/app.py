"""The aiohttp application that behaves like fal's queue API for the FLUX.1 Kontext family.

:class:`_EmulatorCore` puts the handler mixins together (``queue_api``, ``outputs``,
``admin``, all on the shared state in ``core``) and holds the route table. The job clock
is in ``jobs``; the threaded runner that serves this app is ``server.FluxEmulator``.

Endpoints (``{app}`` = owner/app, the first two segments of the model path):

* ``POST /{model path}`` submit (200, 422 validation, scripted 429/503/...); validated:
  ``fal-ai/flux-pro/kontext[/max]`` (edit), ``.../kontext[/max]/multi``,
  ``.../kontext[/max]/text-to-image``; other paths take any JSON object
* ``GET /{app}/requests/{id}/status[?logs=1]`` 202 IN_QUEUE/IN_PROGRESS, 200 COMPLETED
* ``GET /{app}/requests/{id}/status/stream[?logs=1]`` SSE, closed after COMPLETED
* ``GET /{app}/requests/{id}`` result (400 while running or if cancelled)
* ``PUT /{app}/requests/{id}/cancel`` 202 / 400 ALREADY_COMPLETED / 404 NOT_FOUND
* ``GET /cdn/files/{id}/{index}.{ext}`` image bytes, no auth
* ``/_emulator/{health,requests,jobs,scenarios,reset}`` admin, no auth (``jobs`` gives each
  job's ``submitted_at``, ``started_at``, ``completed_at``, ``held_at`` (the closed gate that
  holds it) and, while queued, ``queue_position``); ``POST /_emulator/gates/{name}/hold`` and
  ``.../release`` close and open a gate of ``Scenario.hold_queue``/``hold_run``/``hold_submit``

Decisions where fal's behaviour is unknown or simplified:

* Cancel before completion ends the job at once: COMPLETED with
  ``error_type: request_cancelled``; its result is 400 ``Request was cancelled``.
  ``Scenario.cancel_response`` answers with the given status and leaves the job alone
  (e.g. "acknowledged, but it still finishes", which fal allows).
* ``X-Fal-Request-Timeout`` shorter than the queue time ends the job COMPLETED at the
  deadline, without running, with ``error_type: request_timeout``; its result is 504 with
  ``X-Fal-Request-Timeout-Type: user``. A value of 1 s or less, or not a number, is a 422
  naming ``["header", "x-fal-request-timeout"]`` (fal's clients require > 1 s).
* ``X-Fal-Queue-Priority`` must be ``normal`` or ``low`` (else 422 naming the header); it
  is recorded on the job but does not change its timing.
* Edit inputs are loaded when the job leaves the queue (``fetch``); the job cannot complete
  before they are. One that cannot be loaded ends the job COMPLETED at once, with no
  ``error`` in the status body; its result is 422 ``image_load_error`` naming the field
  (``["body", "image_urls", 1]``) and echoing the URL in ``msg`` and ``input``.
* With a concurrency limit (``accounts``), an account is one ``Authorization`` header value
  (``Key abc`` and ``Bearer abc`` are two); slots go to the waiting jobs in submit order,
  ``queue_position`` is the number of the account's jobs ahead still waiting (plus a
  scenario's scripted ``queue_position``, if any), a cancelled running job frees its slot at
  once, and an ``X-Fal-Request-Timeout`` counts the wait for a slot too.
* Unknown body fields are ignored (not rejected), on every endpoint.
* Images flagged by ``Scenario.nsfw`` are rendered black, as FLUX returns them.
* ``status_errors`` entry ``"malformed"`` on a stream sends one truncated ``data:``
  event and closes; a ``"drop"`` stream whose first event is already COMPLETED just
  completes normally.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from airflow_flux.emulator.admin import _AdminHandlers
from airflow_flux.emulator.outputs import _OutputHandlers
from airflow_flux.emulator.queue_api import _QueueHandlers

if TYPE_CHECKING:
    from airflow_flux.emulator.core import Handler


class _EmulatorCore(_QueueHandlers, _OutputHandlers, _AdminHandlers):
    """State and request handlers; everything here runs on the server's event loop
    except the public accessors, which take ``lock``."""

    # ---- setup

    def make_app(self) -> web.Application:
        """Build the aiohttp application; admin and CDN routes first so the catch-all
        model routes cannot shadow them."""

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            # A plain function: aiohttp cannot tag a bound method as a new-style middleware.
            return await self._middleware(request, handler)

        app = web.Application(middlewares=[middleware], client_max_size=8 * 1024 * 1024)
        r = app.router
        r.add_get("/_emulator/health", self.admin_health, name="admin-health")
        r.add_get("/_emulator/requests", self.admin_requests, name="admin-requests")
        r.add_get("/_emulator/jobs", self.admin_jobs, name="admin-jobs")
        r.add_post("/_emulator/scenarios", self.admin_scenarios, name="admin-scenarios")
        r.add_post("/_emulator/gates/{name}/{action:hold|release}", self.admin_gate, name="admin-gate")
        r.add_post("/_emulator/reset", self.admin_reset, name="admin-reset")
        r.add_get("/cdn/files/{id}/{index:\\d+}.{ext}", self.cdn, name="cdn")
        r.add_get("/{owner}/{app}/requests/{id}/status/stream", self.stream, name="stream")
        r.add_get("/{owner}/{app}/requests/{id}/status", self.status, name="status")
        r.add_put("/{owner}/{app}/requests/{id}/cancel", self.cancel, name="cancel")
        r.add_get("/{owner}/{app}/requests/{id}", self.result, name="result")
        r.add_post("/{owner}/{app}", self.submit, name="submit-app")
        r.add_post("/{owner}/{app}/{rest:.*}", self.submit, name="submit")
        return app
