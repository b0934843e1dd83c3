"""An aiohttp server that behaves like fal's queue API for FLUX.1 Kontext [pro].

Job state is a pure function of wall-clock time since submit (queue, then run), so
no background task runs per job: polling computes the state, and SSE streams sleep
until the next moment their output can change. That keeps thousands of open
streams cheap on one event loop.

Endpoints (``{app}`` = owner/app, the first two segments of the model path):

* ``POST /{model path}`` submit (200, 422 validation, scripted 429/503/...)
* ``GET /{app}/requests/{id}/status[?logs=1]`` 202 IN_QUEUE/IN_PROGRESS, 200 COMPLETED
* ``GET /{app}/requests/{id}/status/stream[?logs=1]`` SSE, closed after COMPLETED
* ``GET /{app}/requests/{id}`` result (400 while running or if cancelled)
* ``PUT /{app}/requests/{id}/cancel`` 202 / 400 ALREADY_COMPLETED / 404 NOT_FOUND
* ``GET /cdn/files/{id}/{index}.{ext}`` image bytes, no auth
* ``/_emulator/{health,requests,jobs,scenarios,reset}`` admin, no auth

Decisions where fal's behaviour is unknown or simplified:

* Cancel before completion ends the job at once: COMPLETED with
  ``error_type: request_cancelled``; its result is 400 ``Request was cancelled``.
  ``Scenario.cancel_response`` answers with the given status and leaves the job alone
  (e.g. "acknowledged, but it still finishes", which fal allows).
* ``X-Fal-Request-Timeout`` shorter than the queue time ends the job COMPLETED with
  ``error_type: request_timeout``; its result is 504 with
  ``X-Fal-Request-Timeout-Type: user``.
* Images flagged by ``Scenario.nsfw`` are rendered black, as FLUX returns them.
* ``status_errors`` entry ``"malformed"`` on a stream sends one truncated ``data:``
  event and closes; a ``"drop"`` stream whose first event is already COMPLETED just
  completes normally.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

from aiohttp import web

from airflow_flux.emulator import images

__all__ = [
    "CALL_KINDS",
    "FAL_QUEUE_BASE",
    "FluxEmulator",
    "Job",
    "RecordedRequest",
    "Scenario",
]

FAL_QUEUE_BASE = "https://queue.fal.run"
KONTEXT_TEXT_TO_IMAGE = "fal-ai/flux-pro/kontext/text-to-image"

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"

#: Values of ``RecordedRequest.kind``.
CALL_KINDS = ("submit", "status", "stream", "result", "cancel", "cdn", "admin", "other")
_API_KINDS = frozenset({"submit", "status", "stream", "result", "cancel"})

_CONTENT_POLICY_MSG = "The content could not be processed because it contained material flagged by a content checker."
# (detail, error_type) for infrastructure errors, as fal reports them.
_INFRA_ERRORS: dict[int, tuple[str, str]] = {
    500: ("Internal server error", "internal_error"),
    502: ("Bad gateway", "bad_gateway"),
    503: ("Service unavailable", "runner_disconnected"),
    504: ("Request timed out", "request_timeout"),
}
_CANCEL_CODES = {"CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400, "NOT_FOUND": 404}
_STEPS = 28

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Per-request bookkeeping shared by the middleware and handlers. Handlers run in the
# middleware's task, so context variables work and avoid aiohttp's request-key API,
# which changed across the supported aiohttp versions.
_current_record: contextvars.ContextVar[RecordedRequest | None] = contextvars.ContextVar("flux_record", default=None)
_current_stream: contextvars.ContextVar[web.StreamResponse | None] = contextvars.ContextVar("flux_stream", default=None)


def _record() -> RecordedRequest:
    record = _current_record.get()
    if record is None:  # only possible if a handler runs without the middleware
        raise RuntimeError("no request record in context")
    return record


# --------------------------------------------------------------------------- models


@dataclass
class Scenario:
    """Behaviour (timing and faults) for the submits it applies to.

    ``None`` timings fall back to the emulator's defaults. Counted faults
    (``submit_errors``, ``status_errors``, ``result_errors``) are consumed in order.
    """

    queue_seconds: float | None = None
    run_seconds: float | None = None
    queue_position: int = 0
    submit_errors: list[int] = field(default_factory=list)
    retry_after: float | None = 1.0
    status_errors: list[int | str] = field(default_factory=list)
    stream: str = "ok"
    stream_drop_after: float = 0.2
    complete_error: dict[str, str] | None = None
    result_errors: list[int] = field(default_factory=list)
    result_error_always: int | None = None
    result_expired: bool = False
    never_complete: bool = False
    nsfw: list[bool] | None = None
    image_bytes: int | None = None
    cdn_bytes_per_second: float | None = None
    cdn_break_after: int | None = None
    cancel_response: str | None = None

    def __post_init__(self) -> None:
        if self.stream not in ("ok", "refuse", "drop"):
            raise ValueError(f"stream must be 'ok', 'refuse' or 'drop', not {self.stream!r}")
        for item in self.status_errors:
            if not isinstance(item, int) and item != "malformed":
                raise ValueError(f"status_errors items must be ints or 'malformed': {item!r}")
        if self.cancel_response is not None and self.cancel_response not in _CANCEL_CODES:
            raise ValueError(f"cancel_response must be one of {sorted(_CANCEL_CODES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        """Build from JSON (admin endpoint); unknown keys are an error, not silently dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown scenario fields: {', '.join(unknown)}")
        return cls(**data)


@dataclass
class RecordedRequest:
    """One HTTP request the emulator received (``status`` is 0 while a stream is open)."""

    kind: str
    method: str
    path: str
    query: str
    status: int
    authorization: str | None
    request_id: str | None
    time: float
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


@dataclass(eq=False)
class Job:
    """A submitted request. Its state is derived from the clock, see :meth:`state_at`."""

    request_id: str
    app_id: str
    model_path: str
    input: dict[str, Any]
    scenario: Scenario
    submitted_at: float
    queue_seconds: float
    run_seconds: float
    seed: int
    response_url: str
    status_url: str
    cancel_url: str
    cancelled: bool = False
    cancelled_at: float | None = None
    #: Set when ``X-Fal-Request-Timeout`` expires before the job would leave the queue.
    deadline_at: float | None = None
    status_calls: int = 0
    result_calls: int = 0
    # Woken on cancel or shutdown so sleeping SSE streams react at once.
    wakeup: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def queue_end(self) -> float:
        """When the job leaves the queue."""
        return self.submitted_at + self.queue_seconds

    @property
    def natural_end(self) -> float | None:
        """When the job completes if nothing interrupts it (None: never)."""
        if self.scenario.never_complete:
            return None
        return self.queue_end + self.run_seconds

    @property
    def end_time(self) -> float | None:
        """When the job is (or will be) COMPLETED, whatever the reason."""
        times = [t for t in (self.natural_end, self.cancelled_at, self.deadline_at) if t is not None]
        return min(times) if times else None

    @property
    def outcome(self) -> str:
        """``"ok"``, ``"cancelled"`` or ``"timeout"``: how the job ends (or will end)."""
        end = self.end_time
        if end is not None and end == self.cancelled_at:
            return "cancelled"
        if end is not None and end == self.deadline_at:
            return "timeout"
        return "ok"

    @property
    def completed_at(self) -> float | None:
        """``time.time()`` at which the job became COMPLETED, or None if it has not yet."""
        end = self.end_time
        return end if end is not None and end <= time.time() else None

    @property
    def state(self) -> str:
        """Current status string."""
        return self.state_at(time.time())

    @property
    def num_images(self) -> int:
        """Number of images the request asked for."""
        value = self.input.get("num_images", 1)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1

    def state_at(self, now: float) -> str:
        """Status at wall-clock time ``now``."""
        end = self.end_time
        if end is not None and now >= end:
            return COMPLETED
        if now < self.queue_end:
            return IN_QUEUE
        return IN_PROGRESS

    def queue_position_at(self, now: float) -> int:
        """Counts down from the scenario's position to 0 in equal steps over the queue time."""
        initial = self.scenario.queue_position
        if initial <= 0 or self.queue_seconds <= 0:
            return 0
        slot = self.queue_seconds / (initial + 1)
        return max(0, initial - int((now - self.submitted_at) / slot))

    def _log_schedule(self) -> list[tuple[float, str]]:
        start = self.queue_end
        schedule = [
            (start, "Starting generation"),
            (start + self.run_seconds * 10 / _STEPS, f"Step 10/{_STEPS}"),
            (start + self.run_seconds * 20 / _STEPS, f"Step 20/{_STEPS}"),
        ]
        natural = self.natural_end
        if natural is not None:
            schedule.append((natural, "Generation complete"))
        return schedule

    def logs_at(self, now: float) -> list[dict[str, str]]:
        """Log lines visible at ``now``; later lines appear as time passes."""
        end = self.end_time
        limit = now if end is None else min(now, end)
        entries = [(t, msg) for t, msg in self._log_schedule() if t <= limit]
        if self.outcome == "cancelled" and end is not None and now >= end:
            # The natural completion line must not appear for a cancelled job.
            entries = [(t, m) for t, m in entries if t < end] + [(end, "Request cancelled")]
        if self.outcome == "timeout" and end is not None and now >= end:
            entries = [(end, "Request timed out in queue")]
        return [{"message": msg, "level": "INFO", "source": "user", "timestamp": _iso(t)} for t, msg in entries]

    def next_change(self, now: float, with_logs: bool) -> float | None:
        """Earliest time after ``now`` at which the status body can change."""
        candidates: list[float] = []
        end = self.end_time
        if end is not None:
            candidates.append(end)
        candidates.append(self.queue_end)
        initial = self.scenario.queue_position
        if initial > 0 and self.queue_seconds > 0:
            slot = self.queue_seconds / (initial + 1)
            step = int((now - self.submitted_at) / slot) + 1
            if step <= initial:
                candidates.append(self.submitted_at + step * slot)
        if with_logs:
            candidates.extend(t for t, _ in self._log_schedule())
        future = [t for t in candidates if t > now]
        return min(future) if future else None

    def error_fields(self) -> dict[str, str]:
        """``error``/``error_type`` added to the COMPLETED status body, if any."""
        outcome = self.outcome
        if outcome == "cancelled":
            return {"error": "Request was cancelled", "error_type": "request_cancelled"}
        if outcome == "timeout":
            return {"error": "Request timed out before it started", "error_type": "request_timeout"}
        if self.scenario.complete_error:
            err = self.scenario.complete_error
            return {
                "error": str(err.get("error", "Internal error")),
                "error_type": str(err.get("error_type", "internal_error")),
            }
        return {}

    def inference_time(self) -> float:
        """Seconds spent IN_PROGRESS (the full run unless interrupted)."""
        end = self.end_time
        if end is None:
            return self.run_seconds
        return round(max(0.0, end - self.queue_end), 3)


# --------------------------------------------------------------------------- helpers


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _format_seconds(value: float) -> str:
    return f"{value:g}"


def _http_reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


def _validation_error(
    field_name: str | None, msg: str, type_: str, value: Any, ctx: dict[str, Any] | None = None
) -> dict[str, Any]:
    loc: list[str] = ["body"] if field_name is None else ["body", field_name]
    err: dict[str, Any] = {"loc": loc, "msg": msg, "type": type_, "input": value}
    if ctx is not None:
        err["ctx"] = ctx
    return err


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _literal_error(name: str, value: Any, allowed: list[str]) -> dict[str, Any]:
    quoted = [f"'{a}'" for a in allowed]
    expected = ", ".join(quoted[:-1]) + f" or {quoted[-1]}"
    return _validation_error(name, f"Input should be {expected}", "literal_error", value, {"expected": expected})


def validate_kontext_input(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Validate a FLUX.1 Kontext [pro] text-to-image body; returns pydantic-style errors."""
    errors: list[dict[str, Any]] = []
    if "prompt" not in body:
        errors.append(_validation_error("prompt", "Field required", "missing", body))
    elif not isinstance(body["prompt"], str):
        errors.append(_validation_error("prompt", "Input should be a valid string", "string_type", body["prompt"]))
    elif not body["prompt"].strip():
        errors.append(
            _validation_error(
                "prompt",
                "String should have at least 1 character",
                "string_too_short",
                body["prompt"],
                {"min_length": 1},
            )
        )
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        errors.append(_validation_error("seed", "Input should be a valid integer", "int_type", seed))
    ranges: list[tuple[str, bool, float, float]] = [
        ("guidance_scale", False, 1, 20),
        ("num_images", True, 1, 4),
    ]
    for name, integer, low, high in ranges:
        if name not in body:
            continue
        value = body[name]
        if integer and not _is_int(value):
            errors.append(_validation_error(name, "Input should be a valid integer", "int_type", value))
        elif not integer and not _is_number(value):
            errors.append(_validation_error(name, "Input should be a valid number", "float_type", value))
        elif value < low:
            errors.append(
                _validation_error(
                    name,
                    f"Input should be greater than or equal to {low:g}",
                    "greater_than_equal",
                    value,
                    {"ge": low},
                )
            )
        elif value > high:
            errors.append(
                _validation_error(
                    name,
                    f"Input should be less than or equal to {high:g}",
                    "less_than_equal",
                    value,
                    {"le": high},
                )
            )
    literals: list[tuple[str, list[str]]] = [
        ("output_format", list(images.OUTPUT_FORMATS)),
        ("safety_tolerance", ["1", "2", "3", "4", "5", "6"]),
        ("aspect_ratio", list(images.ASPECT_RATIO_SIZES)),
    ]
    for name, allowed in literals:
        if name in body and body[name] not in allowed:
            errors.append(_literal_error(name, body[name], allowed))
    for name in ("enhance_prompt", "sync_mode"):
        if name in body and not isinstance(body[name], bool):
            errors.append(_validation_error(name, "Input should be a valid boolean", "bool_type", body[name]))
    return errors


# --------------------------------------------------------------------------- core app


class _EmulatorCore:
    """State and request handlers; everything here runs on the server's event loop
    except the public accessors, which take ``lock``."""

    def __init__(
        self,
        *,
        queue_seconds: float,
        run_seconds: float,
        token: str | None,
        url_mode: str,
        ping_interval: float,
    ) -> None:
        self.queue_seconds = queue_seconds
        self.run_seconds = run_seconds
        self.token = token
        self.url_mode = url_mode
        self.ping_interval = ping_interval
        self.base_url = ""  # set once the socket is bound
        self.public_url: str | None = None
        self.lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self.jobs: dict[str, Job] = {}
        # Insertion-ordered: the first registered match found in the prompt wins.
        self.scenarios: dict[str, Scenario] = {}
        self.default_scenario = Scenario()
        self.submit_error_counts: dict[str | None, int] = {}
        self.cache = images.ImageCache()
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: dict[tuple[str, int], asyncio.Future[bytes]] = {}
        # Keyed per stream (several streams may watch one job): woken all at shutdown.
        self._active_streams: dict[int, asyncio.Event] = {}
        self.closing = False
        self._closing_event: asyncio.Event | None = None

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
        r.add_post("/_emulator/reset", self.admin_reset, name="admin-reset")
        r.add_get("/cdn/files/{id}/{index:\\d+}.{ext}", self.cdn, name="cdn")
        r.add_get("/{owner}/{app}/requests/{id}/status/stream", self.stream, name="stream")
        r.add_get("/{owner}/{app}/requests/{id}/status", self.status, name="status")
        r.add_put("/{owner}/{app}/requests/{id}/cancel", self.cancel, name="cancel")
        r.add_get("/{owner}/{app}/requests/{id}", self.result, name="result")
        r.add_post("/{owner}/{app}", self.submit, name="submit-app")
        r.add_post("/{owner}/{app}/{rest:.*}", self.submit, name="submit")
        return app

    def on_started(self) -> None:
        """Called on the loop once listening (again after a restart)."""
        self.closing = False
        self._closing_event = asyncio.Event()
        # Pillow work runs here, off the event loop.
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="flux-emulator-render")

    def on_stopped(self) -> None:
        """Release the render threads (pending renders are dropped)."""
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None

    def begin_shutdown(self) -> None:
        """Wake every sleeping stream / slow download so the server can stop promptly."""
        self.closing = True
        if self._closing_event is not None:
            self._closing_event.set()
        for event in list(self._active_streams.values()):
            event.set()

    # ---- public-state helpers (any thread)

    def public_base(self) -> str:
        """Base URL for CDN links and ``url_mode="self"``."""
        return (self.public_url or self.base_url).rstrip("/")

    def queue_base(self) -> str:
        """Base URL of the queue URLs returned by submit."""
        if self.url_mode == "fal":
            return FAL_QUEUE_BASE
        if self.url_mode == "self":
            return self.public_base()
        return self.url_mode.rstrip("/")

    def add_scenario(self, scenario: Scenario, match: str | None) -> None:
        with self.lock:
            if match is None:
                self.default_scenario = scenario
            else:
                self.scenarios.pop(match, None)
                self.scenarios[match] = scenario
            self.submit_error_counts.pop(match, None)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.jobs.clear()
            self.scenarios.clear()
            self.default_scenario = Scenario()
            self.submit_error_counts.clear()
        self.cache.clear()

    def _match_scenario(self, prompt: str) -> tuple[str | None, Scenario]:
        with self.lock:
            for match, scenario in self.scenarios.items():
                if match in prompt:
                    return match, scenario
            return None, self.default_scenario

    # ---- middleware: recording, auth, JSON errors

    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route_name = request.match_info.route.name
        kind = route_name.split("-")[0] if route_name else "other"
        record = RecordedRequest(
            kind=kind,
            method=request.method,
            path=request.path,
            query=request.query_string,
            status=0,
            authorization=request.headers.get("Authorization"),
            request_id=request.match_info.get("id"),
            time=time.time(),
            headers=dict(request.headers),
        )
        with self.lock:
            self.requests.append(record)
        record_token = _current_record.set(record)
        stream_token = _current_stream.set(None)
        response: web.StreamResponse | None = None
        try:
            if kind in _API_KINDS:
                response = self._check_auth(request)
            if response is None:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    # aiohttp's own 404/405 etc.: answer in fal's JSON shape.
                    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
                    response = _json({"detail": exc.reason}, exc.status, headers)
            return response
        finally:
            status = response.status if response is not None else 0
            stream = _current_stream.get()
            if status == 0 and stream is not None:
                status = stream.status  # stream ended by disconnect/cancel
            with self.lock:
                record.status = status
            _current_stream.reset(stream_token)
            _current_record.reset(record_token)

    def _check_auth(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() not in ("key", "bearer") or not credential:
            return _json({"detail": "Missing or invalid authorization"}, 401)
        if self.token is not None and not hmac.compare_digest(credential.encode(), self.token.encode()):
            return _json({"detail": "Invalid API key"}, 403)
        return None

    # ---- error bodies

    def _error_response(self, code: int, *, retry_after: float | None = None, prompt: Any = None) -> web.Response:
        """A fal-shaped error for ``code`` (used by scripted faults)."""
        headers: dict[str, str] = {}
        body: dict[str, Any]
        if code == 422:
            body = {
                "detail": [
                    {
                        "loc": ["body", "prompt"],
                        "msg": _CONTENT_POLICY_MSG,
                        "type": "content_policy_violation",
                        "ctx": {},
                        "input": prompt,
                    }
                ]
            }
        elif code == 429:
            body = {"detail": "Too many requests"}
        elif code == 404:
            body = {"detail": "Request not found"}
        elif code >= 500:
            detail, error_type = _INFRA_ERRORS.get(code, ("Internal server error", "internal_error"))
            body = {"detail": detail, "error_type": error_type}
            headers["X-Fal-Error-Type"] = error_type
        else:
            body = {"detail": _http_reason(code)}
        if code in (429, 503) and retry_after is not None:
            headers["Retry-After"] = _format_seconds(retry_after)
        return _json(body, code, headers)

    # ---- submit

    async def submit(self, request: web.Request) -> web.Response:
        """``POST /{owner}/{app}[/{rest}]``: queue a request."""
        owner, app = request.match_info["owner"], request.match_info["app"]
        rest = request.match_info.get("rest", "").strip("/")
        model_path = f"{owner}/{app}/{rest}" if rest else f"{owner}/{app}"
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            return _json({"detail": [_validation_error(None, "JSON decode error", "json_invalid", None)]}, 422)
        _record().body = body
        if not isinstance(body, dict):
            return _json(
                {"detail": [_validation_error(None, "Input should be a valid dictionary", "dict_type", body)]},
                422,
            )
        prompt = body.get("prompt")
        match, scenario = self._match_scenario(prompt if isinstance(prompt, str) else "")

        # Scripted submit failures come before validation: they model a full queue /
        # unavailable gateway, which rejects without looking at the body.
        with self.lock:
            attempt = self.submit_error_counts.get(match, 0)
            self.submit_error_counts[match] = attempt + 1
        if attempt < len(scenario.submit_errors):
            code = scenario.submit_errors[attempt]
            return self._error_response(code, retry_after=scenario.retry_after, prompt=prompt)

        if model_path == KONTEXT_TEXT_TO_IMAGE:
            errors = validate_kontext_input(body)
            if errors:
                return _json({"detail": errors}, 422)

        now = time.time()
        request_id = str(uuid.uuid4())
        given_seed = body.get("seed")
        # Without a seed, derive one from the request id so results are reproducible.
        seed = (
            given_seed
            if isinstance(given_seed, int) and not isinstance(given_seed, bool)
            else uuid.UUID(request_id).int % 2**31
        )
        app_id = f"{owner}/{app}"
        base = f"{self.queue_base()}/{app_id}/requests/{request_id}"
        queue_seconds = scenario.queue_seconds if scenario.queue_seconds is not None else self.queue_seconds
        job = Job(
            request_id=request_id,
            app_id=app_id,
            model_path=model_path,
            input=body,
            scenario=scenario,
            submitted_at=now,
            queue_seconds=queue_seconds,
            run_seconds=scenario.run_seconds if scenario.run_seconds is not None else self.run_seconds,
            seed=seed,
            response_url=base,
            status_url=f"{base}/status",
            cancel_url=f"{base}/cancel",
        )
        timeout = request.headers.get("X-Fal-Request-Timeout")
        if timeout:
            try:
                seconds = float(timeout)
            except ValueError:
                seconds = math.inf
            if seconds < queue_seconds:
                job.deadline_at = now + max(0.0, seconds)
        with self.lock:
            self.jobs[request_id] = job
        _record().request_id = request_id
        return _json(
            {
                "status": IN_QUEUE,
                "request_id": request_id,
                "response_url": job.response_url,
                "status_url": job.status_url,
                "cancel_url": job.cancel_url,
                "logs": None,
                "metrics": {},
                "queue_position": job.queue_position_at(now),
            }
        )

    # ---- status (poll and SSE)

    def _get_job(self, request: web.Request) -> Job | None:
        with self.lock:
            job = self.jobs.get(request.match_info["id"])
        # Like fal, the id lives under the app that ran it: another owner/app is a 404.
        app_id = f"{request.match_info.get('owner')}/{request.match_info.get('app')}"
        if job is not None and "owner" in request.match_info and app_id != job.app_id:
            return None
        return job

    def _status_body(self, job: Job, now: float, with_logs: bool) -> dict[str, Any]:
        state = job.state_at(now)
        body: dict[str, Any] = {
            "status": state,
            "request_id": job.request_id,
            "response_url": job.response_url,
            "status_url": job.status_url,
            "cancel_url": job.cancel_url,
            "logs": job.logs_at(now) if with_logs and state != IN_QUEUE else None,
        }
        if state == IN_QUEUE:
            body["queue_position"] = job.queue_position_at(now)
        elif state == COMPLETED:
            body["metrics"] = {"inference_time": job.inference_time()}
            body.update(job.error_fields())
        return body

    def _take_status_fault(self, job: Job) -> int | str | None:
        with self.lock:
            index = job.status_calls
            job.status_calls += 1
        errors = job.scenario.status_errors
        return errors[index] if index < len(errors) else None

    @staticmethod
    def _wants_logs(request: web.Request) -> bool:
        return request.query.get("logs", "0").lower() in ("1", "true", "yes")

    async def status(self, request: web.Request) -> web.Response:
        """``GET .../requests/{id}/status``: 202 while queued/running, 200 when done."""
        job = self._get_job(request)
        if job is None:
            return _json({"detail": "Request not found"}, 404)
        fault = self._take_status_fault(job)
        if fault == "malformed":
            return web.Response(status=200, body=b'{"status": "IN_PRO', content_type="application/json")
        if isinstance(fault, int):
            return self._error_response(fault, retry_after=job.scenario.retry_after)
        body = self._status_body(job, time.time(), self._wants_logs(request))
        return _json(body, 200 if body["status"] == COMPLETED else 202)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """``GET .../status/stream``: SSE of status changes, closed after COMPLETED."""
        job = self._get_job(request)
        if job is None:
            return _json({"detail": "Request not found"}, 404)
        scenario = job.scenario
        if scenario.stream == "refuse":
            return _json({"detail": "Not found"}, 404)
        fault = self._take_status_fault(job)
        if isinstance(fault, int):
            return self._error_response(fault, retry_after=scenario.retry_after)
        with_logs = self._wants_logs(request)
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            },
        )
        _current_stream.set(response)
        await response.prepare(request)
        if fault == "malformed":
            # A garbled event on an otherwise healthy stream, then a clean close.
            await response.write(b'data: {"status": "IN_PRO\n\n')
            await response.write_eof()
            return response

        loop = asyncio.get_running_loop()
        self._active_streams[id(response)] = job.wakeup
        try:
            last_payload: str | None = None
            last_write = loop.time()
            while not self.closing:
                now = time.time()
                body = self._status_body(job, now, with_logs)
                payload = json.dumps(body)
                if payload != last_payload:
                    await response.write(f"data: {payload}\n\n".encode())
                    last_payload = payload
                    last_write = loop.time()
                    if body["status"] == COMPLETED:
                        break
                    if scenario.stream == "drop":
                        await self._sleep(scenario.stream_drop_after)
                        # Abort without the terminating chunk: the client sees a broken stream.
                        if request.transport is not None:
                            request.transport.abort()
                        return response
                next_change = job.next_change(now, with_logs)
                timeout = last_write + self.ping_interval - loop.time()
                if next_change is not None:
                    # A hair late so the state has surely flipped when we look again.
                    timeout = min(timeout, next_change - now + 0.002)
                if timeout > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(job.wakeup.wait(), timeout)
                if loop.time() - last_write >= self.ping_interval:
                    await response.write(b": ping\n\n")
                    last_write = loop.time()
        finally:
            self._active_streams.pop(id(response), None)
        await response.write_eof()
        return response

    async def _sleep(self, seconds: float) -> None:
        """Sleep that ends early when the server shuts down."""
        if self._closing_event is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing_event.wait(), seconds)

    # ---- result

    async def result(self, request: web.Request) -> web.Response:
        """``GET .../requests/{id}``: the model output once COMPLETED."""
        job = self._get_job(request)
        if job is None:
            return _json({"detail": "Request not found"}, 404)
        now = time.time()
        if job.state_at(now) != COMPLETED:
            return _json({"detail": "Request is still in progress"}, 400)
        scenario = job.scenario
        prompt = job.input.get("prompt")
        with self.lock:
            index = job.result_calls
            job.result_calls += 1
        outcome = job.outcome
        if outcome == "cancelled":
            return _json(
                {"detail": "Request was cancelled", "error_type": "request_cancelled"},
                400,
                {"X-Fal-Error-Type": "request_cancelled"},
            )
        if outcome == "timeout":
            return _json(
                {"detail": "Request timed out before it started", "error_type": "request_timeout"},
                504,
                {"X-Fal-Error-Type": "request_timeout", "X-Fal-Request-Timeout-Type": "user"},
            )
        if scenario.result_expired:
            return _json({"detail": "Request not found"}, 404)
        if scenario.complete_error:
            fields = job.error_fields()
            return _json(
                {"detail": fields["error"], "error_type": fields["error_type"]},
                500,
                {"X-Fal-Error-Type": fields["error_type"]},
            )
        if scenario.result_error_always is not None:
            return self._error_response(scenario.result_error_always, retry_after=scenario.retry_after, prompt=prompt)
        if index < len(scenario.result_errors):
            return self._error_response(scenario.result_errors[index], retry_after=scenario.retry_after, prompt=prompt)

        fmt = images.normalize_format(job.input.get("output_format"))
        ext = images.extension_for(fmt)
        content_type = images.content_type_for(fmt)
        width, height = images.image_size(_aspect_ratio(job))
        blobs = await asyncio.gather(*(self._image_bytes(job, i) for i in range(job.num_images)))
        sync_mode = job.input.get("sync_mode") is True
        out: list[dict[str, Any]] = []
        for i, data in enumerate(blobs):
            if sync_mode:
                url = f"data:{content_type};base64,{base64.b64encode(data).decode()}"
            else:
                url = f"{self.public_base()}/cdn/files/{job.request_id}/{i}.{ext}"
            out.append(
                {
                    "url": url,
                    "width": width,
                    "height": height,
                    "content_type": content_type,
                    "file_name": f"{i}.{ext}",
                    "file_size": len(data),
                }
            )
        return _json(
            {
                "images": out,
                "timings": {"inference": job.run_seconds},
                "seed": job.seed,
                "has_nsfw_concepts": _nsfw_flags(job),
                "prompt": prompt,
            }
        )

    async def _image_bytes(self, job: Job, index: int) -> bytes:
        """Rendered bytes from the LRU, rendering off-loop once even under concurrency."""
        key = (job.request_id, index)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        future = self._inflight.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            render = functools.partial(
                images.render_image,
                str(job.input.get("prompt", "")),
                job.seed,
                index,
                aspect_ratio=_aspect_ratio(job),
                output_format=job.input.get("output_format"),
                min_bytes=job.scenario.image_bytes,
                blank=_nsfw_flags(job)[index],
            )
            future = loop.run_in_executor(self.executor, render)
            self._inflight[key] = future

            def _done(fut: asyncio.Future[bytes]) -> None:
                self._inflight.pop(key, None)
                if not fut.cancelled() and fut.exception() is None:
                    self.cache.put(key, fut.result())

            future.add_done_callback(_done)
        return await asyncio.shield(future)

    # ---- cancel

    async def cancel(self, request: web.Request) -> web.Response:
        """``PUT .../requests/{id}/cancel``."""
        job = self._get_job(request)
        if job is None:
            return _json({"status": "NOT_FOUND"}, 404)
        override = job.scenario.cancel_response
        if override is not None:
            # Scripted answer; the job is left alone (e.g. "acknowledged but still finishes").
            return _json({"status": override}, _CANCEL_CODES[override])
        now = time.time()
        with self.lock:
            if job.state_at(now) == COMPLETED:
                return _json({"status": "ALREADY_COMPLETED"}, 400)
            job.cancelled = True
            job.cancelled_at = now
        job.wakeup.set()
        return _json({"status": "CANCELLATION_REQUESTED"}, 202)

    # ---- CDN

    async def cdn(self, request: web.Request) -> web.StreamResponse:
        """``GET /cdn/files/{id}/{index}.{ext}``: public image bytes with optional faults."""
        job = self._get_job(request)
        index = int(request.match_info["index"])
        if job is None or job.outcome != "ok" or job.completed_at is None:
            return _json({"detail": "File not found"}, 404)
        fmt = images.normalize_format(job.input.get("output_format"))
        ext = request.match_info["ext"].lower()
        if index >= job.num_images or ext not in (images.extension_for(fmt), fmt):
            return _json({"detail": "File not found"}, 404)
        data = await self._image_bytes(job, index)
        content_type = images.content_type_for(fmt)
        if request.method == "HEAD":
            return web.Response(status=200, headers={"Content-Type": content_type, "Content-Length": str(len(data))})
        scenario = job.scenario
        if scenario.cdn_bytes_per_second is None and scenario.cdn_break_after is None:
            return web.Response(body=data, content_type=content_type)

        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        response.content_length = len(data)
        await response.prepare(request)
        limit = len(data)
        if scenario.cdn_break_after is not None:
            limit = min(limit, max(0, scenario.cdn_break_after))
        rate = scenario.cdn_bytes_per_second
        # ~20 writes per second when throttled; big chunks otherwise.
        chunk = max(1, int(rate / 20)) if rate else 256 * 1024
        pos = 0
        while pos < limit and not self.closing:
            piece = data[pos : min(pos + chunk, limit)]
            await response.write(piece)
            pos += len(piece)
            if rate:
                await self._sleep(len(piece) / rate)
        if limit < len(data) or pos < limit:
            # Broken download: the promised Content-Length is never reached.
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        return response

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


def _aspect_ratio(job: Job) -> str:
    value = job.input.get("aspect_ratio")
    return value if isinstance(value, str) and value in images.ASPECT_RATIO_SIZES else "1:1"


def _nsfw_flags(job: Job) -> list[bool]:
    flags = list(job.scenario.nsfw or [])[: job.num_images]
    return [bool(f) for f in flags] + [False] * (job.num_images - len(flags))


# --------------------------------------------------------------------------- threaded runner


class FluxEmulator:
    """Runs the emulator on a real socket in a daemon thread with its own event loop.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        queue_seconds: float = 1.0,
        run_seconds: float = 3.0,
        token: str | None = None,
        url_mode: str = "fal",
        ping_interval: float = 15.0,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        public_url: str | None = None,
        access_log: bool = False,
    ) -> None:
        if url_mode not in ("fal", "self") and not url_mode.startswith("http"):
            raise ValueError("url_mode must be 'fal', 'self' or an http(s) base URL")
        if ping_interval <= 0:
            raise ValueError("ping_interval must be positive")
        self.host = host
        self._requested_port = port
        self._access_log = access_log
        self._core = _EmulatorCore(
            queue_seconds=queue_seconds,
            run_seconds=run_seconds,
            token=token,
            url_mode=url_mode,
            ping_interval=ping_interval,
        )
        self._core.public_url = public_url
        self._port: int | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None

    # ---- lifecycle

    def __enter__(self) -> FluxEmulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Bind the socket and serve in a daemon thread; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="flux-emulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._thread = None
            raise self._start_error

    def stop(self) -> None:
        """Close open streams and downloads, stop the server and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(concurrent.futures.TimeoutError, RuntimeError):
                future.result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._core.on_stopped()
        self._thread = None
        self._loop = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # surfaced to start()'s caller
            self._start_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _startup(self) -> None:
        app = self._core.make_app()
        extra: dict[str, Any] = {} if self._access_log else {"access_log": None}
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # free handlers of SSE clients that went away
            shutdown_timeout=2.0,  # streams are woken on stop, so this is only a backstop
            **extra,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, backlog=4096)
        await site.start()
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._core.base_url = f"http://{self._url_host()}:{self._port}"
        self._core.on_started()

    async def _shutdown(self) -> None:
        self._core.begin_shutdown()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _url_host(self) -> str:
        # A wildcard bind address is not something a client can connect to.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"[{host}]" if ":" in host else host

    # ---- configuration and inspection (thread-safe)

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        if not self._core.base_url:
            raise RuntimeError("emulator not started")
        return self._core.base_url

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._port is None:
            raise RuntimeError("emulator not started")
        return self._port

    @property
    def url_mode(self) -> str:
        """How queue URLs in submit/status bodies are based (see the package docs)."""
        return self._core.url_mode

    @url_mode.setter
    def url_mode(self, value: str) -> None:
        self._core.url_mode = value

    @property
    def token(self) -> str | None:
        """The accepted API token (None: any non-empty token)."""
        return self._core.token

    @token.setter
    def token(self, value: str | None) -> None:
        self._core.token = value

    def add_scenario(self, scenario: Scenario, match: str | None = None) -> None:
        """Apply ``scenario`` to submits whose prompt contains ``match`` (None: the default).

        Registering the same ``match`` again replaces it and resets its submit-error count.
        """
        self._core.add_scenario(scenario, match)

    def reset(self) -> None:
        """Forget jobs, scenarios and recorded requests."""
        self._core.reset()

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received, in order."""
        with self._core.lock:
            return [dataclasses.replace(r) for r in self._core.requests]

    def calls(self, kind: str | None = None) -> list[RecordedRequest]:
        """Recorded requests of one kind (see ``CALL_KINDS``), or all."""
        return [r for r in self.requests if kind is None or r.kind == kind]

    def clear_requests(self) -> None:
        """Forget recorded requests (jobs are kept)."""
        with self._core.lock:
            self._core.requests.clear()

    @property
    def jobs(self) -> dict[str, Job]:
        """Snapshot dict of request_id -> live :class:`Job`."""
        with self._core.lock:
            return dict(self._core.jobs)

    def complete_time(self, request_id: str) -> float | None:
        """``time.time()`` when the job became COMPLETED; None if unknown or not yet."""
        with self._core.lock:
            job = self._core.jobs.get(request_id)
        return None if job is None else job.completed_at
