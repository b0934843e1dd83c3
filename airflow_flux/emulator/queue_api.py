"""fal's queue API proper: submit, status (poll and SSE stream) and cancel.

A mixin on :class:`~airflow_flux.emulator.core._CoreState` (through ``fetch``, which loads
the input images of edit jobs); see ``app`` for the routes. Under a concurrency limit, submit
and cancel also (re)schedule the account's queue (``accounts``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from aiohttp import web

from airflow_flux.emulator.core import _current_stream, _json, _record
from airflow_flux.emulator.families import input_image_refs, validate_input
from airflow_flux.emulator.fetch import _InputFetchHandlers
from airflow_flux.emulator.jobs import COMPLETED, IN_QUEUE, Job
from airflow_flux.emulator.scenarios import _CANCEL_CODES
from airflow_flux.emulator.validation import _validation_error, validate_request_headers


class _QueueHandlers(_InputFetchHandlers):
    """Handlers for ``POST /{model path}`` and ``.../requests/{id}/{status,status/stream,cancel}``."""

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

        options, errors = validate_request_headers(request.headers)
        errors += validate_input(model_path, body)
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
            priority=options["priority"],
            request_timeout=options["request_timeout"],
            store_io=options["store_io"],
            object_lifecycle_preference=options["object_lifecycle_preference"],
            input_refs=input_image_refs(model_path, body),
            account=request.headers.get("Authorization"),
        )
        seconds = options["request_timeout"]
        job.start_by = None if seconds is None else now + seconds
        with self.lock:
            job.queue_gate = self.gate(scenario.hold_queue)
            job.run_gate = self.gate(scenario.hold_run)
            job.submit_gate = self.gate(scenario.hold_submit)
            if self.concurrency is None:
                # If it would not leave the queue in time, it ends at the deadline, never runs
                # (under a limit the account's schedule decides this).
                self.apply_deadline(job)
            self.jobs[request_id] = job
            self._admit(job, now)
        if job.input_refs:
            self._schedule_input_fetch(job)
        _record().request_id = request_id
        if job.submit_gate is not None and job.submit_gate.closed:
            # Accepted and paid for; the client hears of it when the test releases the gate.
            await job.submit_gate.opened.wait()
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

    def _reported(self, body: dict[str, Any]) -> None:
        """Note on the request's record the status it told the client (after it was sent)."""
        record = _record()
        with self.lock:
            record.statuses.append(body["status"])

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
        self._reported(body)
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
        try:
            last_payload: str | None = None
            last_write = loop.time()
            while not self.closing:
                # Taken before the body: a change from here on sets it (``Job.notify``).
                wakeup = job.wakeup
                self._active_streams[id(response)] = wakeup
                now = time.time()
                body = self._status_body(job, now, with_logs)
                if scenario.stream_event_padding:
                    body["padding"] = "x" * scenario.stream_event_padding
                payload = json.dumps(body)
                if payload != last_payload:
                    await response.write(f"data: {payload}\n\n".encode())
                    self._reported(body)
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
                        await asyncio.wait_for(wakeup.wait(), timeout)
                if loop.time() - last_write >= self.ping_interval:
                    await response.write(b": ping\n\n")
                    last_write = loop.time()
        finally:
            self._active_streams.pop(id(response), None)
        await response.write_eof()
        return response

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
        # Under a limit: a queued job gives up its place, a running one frees its slot now.
        self._reschedule(job, now)
        return _json({"status": "CANCELLATION_REQUESTED"}, 202)
