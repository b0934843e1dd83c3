"""The model output: the result endpoint and the CDN that serves the images.

Images are rendered by :mod:`airflow_flux.emulator.images` off the event loop, once per
image even under concurrency, and kept in an LRU. Edit and multi outputs are derived from
the job's input images (``images._derived_base`` documents how), with the same caption;
their size is the model family's (:func:`~airflow_flux.emulator.families.output_size`). ``images.render_image`` is looked up at
call time (``bench/_emulator.py`` replaces it). A mixin on
:class:`~airflow_flux.emulator.core._CoreState`; see ``app`` for the routes.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from airflow_flux.emulator import images
from airflow_flux.emulator.core import _CoreState, _json
from airflow_flux.emulator.families import billable_units, output_size
from airflow_flux.emulator.jobs import COMPLETED

if TYPE_CHECKING:
    from airflow_flux.emulator.jobs import Job


class _OutputHandlers(_CoreState):
    """Handlers for ``GET .../requests/{id}`` and ``GET /cdn/files/{id}/{index}.{ext}``."""

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
        if outcome == "input_error":
            # fal's answer when an input image cannot be loaded: the model's own 422.
            return _json({"detail": job.input_errors}, 422)
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
        width, height = _output_size(job)
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
        inputs = [(f.width, f.height) for f in job.input_fetches if f.ok and f.width and f.height]
        units = billable_units(job.model_path, len(out), (width, height), inputs)
        return _json(
            {
                "images": out,
                "timings": {"inference": job.run_seconds},
                "seed": job.seed,
                "has_nsfw_concepts": _nsfw_flags(job),
                "prompt": prompt,
            },
            200,
            {"X-Fal-Billable-Units": f"{units:g}"},
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
                dimensions=_output_size(job),
                output_format=job.input.get("output_format"),
                min_bytes=job.scenario.image_bytes,
                blank=_nsfw_flags(job)[index],
                inputs=job.input_images or None,
            )
            future = loop.run_in_executor(self.executor, render)
            self._inflight[key] = future

            def _done(fut: asyncio.Future[bytes]) -> None:
                self._inflight.pop(key, None)
                if not fut.cancelled() and fut.exception() is None:
                    self.cache.put(key, fut.result())

            future.add_done_callback(_done)
        return await asyncio.shield(future)

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


def _output_size(job: Job) -> tuple[int, int]:
    first = next((f for f in job.input_fetches if f.ok and f.width and f.height), None)
    return output_size(job.model_path, job.input, (first.width or 0, first.height or 0) if first else None)


def _nsfw_flags(job: Job) -> list[bool]:
    flags = list(job.scenario.nsfw or [])[: job.num_images]
    return [bool(f) for f in flags] + [False] * (job.num_images - len(flags))
