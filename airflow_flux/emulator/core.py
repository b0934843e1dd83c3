"""What every handler shares: the emulator's state, and the plumbing around the handlers.

:class:`_CoreState` holds the recorded requests, jobs, scenarios, image cache, render
threads and the accounts of a concurrency limit (``accounts``); it runs the middleware
(request recording, auth, aiohttp errors as fal JSON) and builds fal-shaped error bodies.
The handlers are mixins on top of it (``queue_api``, ``outputs``, ``admin``), put together
with the routes in ``app``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import hmac
import threading
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web

from airflow_flux.emulator import images
from airflow_flux.emulator.accounts import Account
from airflow_flux.emulator.jobs import COMPLETED, Gate
from airflow_flux.emulator.scenarios import _API_KINDS, RecordedRequest, Scenario

if TYPE_CHECKING:
    from airflow_flux.emulator.jobs import Job

FAL_QUEUE_BASE = "https://queue.fal.run"

_CONTENT_POLICY_MSG = "The content could not be processed because it contained material flagged by a content checker."
# (detail, error_type) for infrastructure errors, as fal reports them.
_INFRA_ERRORS: dict[int, tuple[str, str]] = {
    500: ("Internal server error", "internal_error"),
    502: ("Bad gateway", "bad_gateway"),
    503: ("Service unavailable", "runner_disconnected"),
    504: ("Request timed out", "request_timeout"),
}

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


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def _format_seconds(value: float) -> str:
    return f"{value:g}"


def _http_reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


class _CoreState:
    """State shared by the request handlers; everything here runs on the server's event
    loop except the public accessors, which take ``lock``."""

    def __init__(
        self,
        *,
        queue_seconds: float,
        run_seconds: float,
        token: str | None,
        url_mode: str,
        ping_interval: float,
        input_fetch_timeout: float = 10.0,
        concurrency: int | None = None,
    ) -> None:
        self.queue_seconds = queue_seconds
        self.run_seconds = run_seconds
        self.token = token
        self.url_mode = url_mode
        self.ping_interval = ping_interval
        #: Seconds allowed to download one input image of an edit (see ``fetch``).
        self.input_fetch_timeout = input_fetch_timeout
        #: Jobs of one account IN_PROGRESS at once at most (None: no limit), see ``accounts``.
        self.concurrency = concurrency
        self.accounts: dict[str | None, Account] = {}
        self.base_url = ""  # set once the socket is bound
        self.public_url: str | None = None
        self.lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self.jobs: dict[str, Job] = {}
        # Insertion-ordered: the first registered match found in the prompt wins.
        self.scenarios: dict[str, Scenario] = {}
        self.default_scenario = Scenario()
        self.submit_error_counts: dict[str | None, int] = {}
        #: The gates of ``Scenario.hold_queue``/``hold_run``/``hold_submit`` by name (the current one of each).
        self.gates: dict[str, Gate] = {}
        self.cache = images.ImageCache()
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: dict[tuple[str, int], asyncio.Future[bytes]] = {}
        # Keyed per stream (several streams may watch one job): woken all at shutdown.
        self._active_streams: dict[int, asyncio.Event] = {}
        # Tasks not tied to a request (input fetches): kept referenced, cancelled at shutdown.
        self._background_tasks: set[asyncio.Task[None]] = set()
        self.closing = False
        self._closing_event: asyncio.Event | None = None
        #: The server's loop while it runs (set by :meth:`on_started`).
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle (called by the runner, see server.FluxEmulator)

    def on_started(self) -> None:
        """Called on the loop once listening (again after a restart)."""
        self.closing = False
        self._closing_event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        # Events are bound to the loop that first waited on them: after a restart, fresh ones.
        with self.lock:
            for job in self.jobs.values():
                job.wakeup = asyncio.Event()
            for gate in self.gates.values():
                if gate.closed:
                    gate.opened = asyncio.Event()
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
        for task in list(self._background_tasks):
            task.cancel()

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
            for gate in self.gates.values():
                # A submit answer still held would wait forever on a forgotten gate.
                if gate.closed and self.loop is not None and not self.loop.is_closed():
                    self.loop.call_soon_threadsafe(gate.opened.set)
            self.requests.clear()
            self.jobs.clear()
            self.accounts.clear()
            self.scenarios.clear()
            self.default_scenario = Scenario()
            self.submit_error_counts.clear()
            self.gates.clear()
        self.cache.clear()

    # ---- gates (``Scenario.hold_queue`` / ``hold_run`` / ``hold_submit``)

    def gate(self, name: str | None) -> Gate | None:
        """The current gate called ``name``, closed if new (hold ``lock``)."""
        if name is None:
            return None
        gate = self.gates.get(name)
        if gate is None:
            gate = self.gates[name] = Gate(name)
        return gate

    def hold_gate(self, name: str) -> None:
        """Close ``name`` for the jobs submitted from now on (those already past it stay so)."""
        with self.lock:
            gate = self.gates.get(name)
            if gate is None or not gate.closed:
                self.gates[name] = Gate(name)

    def release_gate(self, name: str) -> int:
        """Open ``name`` now: the jobs it holds move on (at once if their time is over).

        Runs on the server's loop (it wakes streams and held submit answers). Returns how
        many jobs (or submit answers) it held.
        """
        now = time.time()
        with self.lock:
            gate = self.gate(name)
            assert gate is not None
            held = [
                job
                for job in self.jobs.values()
                if (job.queue_gate is gate or job.run_gate is gate) and job.state_at(now) != COMPLETED
            ]
            answers = sum(1 for job in self.jobs.values() if job.submit_gate is gate and gate.closed)
            if gate.closed:
                gate.released_at = now
                gate.opened.set()  # the submit answers it holds are sent now
            for job in held:
                if not job.limited:
                    self.apply_deadline(job)
        for job in held:
            self._reschedule(job, now)
            job.notify()
        return len(held) + answers

    @staticmethod
    def apply_deadline(job: Job) -> None:
        """Without a concurrency limit: a job that cannot leave the queue by its
        ``X-Fal-Request-Timeout`` (or is held at a closed gate) ends at the deadline,
        unless released in time (called at submit and at each release, before the deadline)."""
        ready = job.ready_at
        if job.start_by is not None and (ready is None or ready > job.start_by):
            job.deadline_at = job.start_by
        else:
            job.deadline_at = None

    def _admit(self, job: Job, now: float) -> None:
        """Give a new job its place in its account's queue (only under a limit; hold ``lock``)."""
        if self.concurrency is None:
            return
        account = self.accounts.get(job.account)
        if account is None:
            account = self.accounts[job.account] = Account(self.concurrency)
        account.add(job, now)

    def _reschedule(self, job: Job, now: float) -> None:
        """Recompute the waiting jobs of ``job``'s account after its times changed at ``now``
        (cancel, inputs loaded) and wake whoever watches them; nothing to do without a limit."""
        if not job.limited:
            return
        with self.lock:
            account = self.accounts.get(job.account)
            waiting = account.schedule(now) if account is not None else []
        for other in waiting:
            other.notify()

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

    # ---- shared by the handlers

    def _get_job(self, request: web.Request) -> Job | None:
        with self.lock:
            job = self.jobs.get(request.match_info["id"])
        # Like fal, the id lives under the app that ran it: another owner/app is a 404.
        app_id = f"{request.match_info.get('owner')}/{request.match_info.get('app')}"
        if job is not None and "owner" in request.match_info and app_id != job.app_id:
            return None
        return job

    async def _sleep(self, seconds: float) -> None:
        """Sleep that ends early when the server shuts down."""
        if self._closing_event is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._closing_event.wait(), seconds)
