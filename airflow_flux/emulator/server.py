"""The threaded runner :class:`FluxEmulator`: the emulator on a real socket, in a daemon thread.

It serves :class:`~airflow_flux.emulator.app._EmulatorCore` (the aiohttp app; its docstring
lists the endpoints) and exposes its state thread-safely. The names tests use are
re-exported here, so ``from airflow_flux.emulator.server import Scenario`` (or ``Job``,
``RecordedRequest``, ``FAL_QUEUE_BASE``, ...) keeps working wherever they now live.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import threading
import time
from typing import Any

from aiohttp import web

from airflow_flux.emulator.accounts import peak_running
from airflow_flux.emulator.app import _EmulatorCore

# Every module-level name of this module from before the split stays importable from here;
# the ``X as X`` ones are not used in this module (and, as before, not in ``__all__``).
from airflow_flux.emulator.core import FAL_QUEUE_BASE
from airflow_flux.emulator.core import Handler as Handler
from airflow_flux.emulator.jobs import COMPLETED as COMPLETED
from airflow_flux.emulator.jobs import IN_PROGRESS as IN_PROGRESS
from airflow_flux.emulator.jobs import IN_QUEUE as IN_QUEUE
from airflow_flux.emulator.jobs import Job
from airflow_flux.emulator.scenarios import CALL_KINDS, InputFetch, RecordedRequest, Scenario
from airflow_flux.emulator.validation import KONTEXT_TEXT_TO_IMAGE as KONTEXT_TEXT_TO_IMAGE
from airflow_flux.emulator.validation import validate_kontext_input as validate_kontext_input

__all__ = [
    "CALL_KINDS",
    "FAL_QUEUE_BASE",
    "FluxEmulator",
    "InputFetch",
    "Job",
    "RecordedRequest",
    "Scenario",
]


class FluxEmulator:
    """Runs the emulator on a real socket in a daemon thread with its own event loop.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    ``input_fetch_timeout`` bounds the download of each input image of an edit.
    ``concurrency=N`` runs at most N jobs of one account (``Authorization`` header value) at
    once, as fal does (2 to 40 there); the others wait ``IN_QUEUE``, first in first out, with a
    falling ``queue_position`` (see ``accounts``). None (the default): no limit.

    What a test reads: :attr:`requests` / :meth:`calls` (every HTTP request received),
    :attr:`jobs` (request id -> live :class:`Job`: ``priority``, ``request_timeout``,
    ``store_io``, ``object_lifecycle_preference``, and for edits ``input_fetches``, a list
    of :class:`InputFetch`, filled once the job has left the queue and loaded its inputs) and
    :meth:`max_running` (the most jobs of one account that ran at once), :meth:`reported` (the
    statuses told to clients) and :meth:`held` (the jobs a gate holds).

    What a test controls: :meth:`add_scenario` (timing and faults per prompt) and the gates of
    ``Scenario.hold_queue`` / ``hold_run`` / ``hold_submit``: :meth:`release` lets the jobs (or
    submit answers) a gate holds move on,
    :meth:`hold` closes it again for later submits.
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
        input_fetch_timeout: float = 10.0,
        concurrency: int | None = None,
    ) -> None:
        if url_mode not in ("fal", "self") and not url_mode.startswith("http"):
            raise ValueError("url_mode must be 'fal', 'self' or an http(s) base URL")
        if ping_interval <= 0:
            raise ValueError("ping_interval must be positive")
        if input_fetch_timeout <= 0:
            raise ValueError("input_fetch_timeout must be positive")
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(concurrency, int)):
            raise ValueError("concurrency must be an int or None")
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.host = host
        self._requested_port = port
        self._access_log = access_log
        self._core = _EmulatorCore(
            queue_seconds=queue_seconds,
            run_seconds=run_seconds,
            token=token,
            url_mode=url_mode,
            ping_interval=ping_interval,
            input_fetch_timeout=input_fetch_timeout,
            concurrency=concurrency,
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
    def concurrency(self) -> int | None:
        """Jobs of one account IN_PROGRESS at once at most (None: no limit)."""
        return self._core.concurrency

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
        """Forget jobs, scenarios, gates and recorded requests."""
        self._core.reset()

    def hold(self, gate: str) -> None:
        """Close ``gate`` (``Scenario.hold_queue``/``hold_run``/``hold_submit``) for the jobs submitted from now
        on. A gate is closed when a scenario first names it; this closes it again after a
        :meth:`release`."""
        self._core.hold_gate(gate)

    def release(self, gate: str) -> int:
        """Open ``gate``: the jobs it holds leave the queue (or complete) now, or when their own
        queue (run) time is over, and the submit answers it holds are sent. Returns how many
        jobs (or answers) it held. Later submits pass it until
        :meth:`hold` closes it again."""
        loop = self._loop
        if loop is None or not loop.is_running():
            raise RuntimeError("emulator not running")
        # On the server's loop: it wakes the streams that watch the released jobs.
        return asyncio.run_coroutine_threadsafe(self._release(gate), loop).result(timeout=10)

    async def _release(self, gate: str) -> int:
        return self._core.release_gate(gate)

    def held(self, gate: str | None = None) -> list[str]:
        """Ids of the jobs a closed gate (``gate``, or any) holds now, in submit order."""
        now = time.time()
        with self._core.lock:
            jobs = list(self._core.jobs.values())
        return [j.request_id for j in jobs if (name := j.held_at(now)) is not None and gate in (None, name)]

    def reported(self, request_id: str | None = None, kind: str | None = None) -> list[str]:
        """The job statuses the emulator told its clients (status answers and stream events), in
        order, for one request id and/or one kind of call (``"status"``, ``"stream"``)."""
        return [
            status
            for r in self.requests
            if (request_id is None or r.request_id == request_id) and (kind is None or r.kind == kind)
            for status in r.statuses
        ]

    @property
    def requests(self) -> list[RecordedRequest]:
        """Snapshot of every request received, in order."""
        with self._core.lock:
            return [dataclasses.replace(r, statuses=list(r.statuses)) for r in self._core.requests]

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

    def max_running(self, authorization: str | None = None) -> int:
        """The most jobs of one account that were IN_PROGRESS at the same moment so far.

        ``authorization`` is the account: the ``Authorization`` header value its submits sent
        (``"Key abc"``; None: no header, which the auth check refuses anyway). Computed from the jobs' start and end
        times, so it covers every moment, not only polled ones; it works without a limit too.
        """
        with self._core.lock:
            jobs = [j for j in self._core.jobs.values() if j.account == authorization]
            return peak_running(jobs, time.time())
