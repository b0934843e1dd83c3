"""Submitting a batch all at once (a batch no larger than its window): pinning, then paying.

Every ``s3://`` input is checked and pinned first (one HEAD per input, a few at a time),
then the requests are submitted from the worker a few at a time, each handle recorded the
moment its submit returns. After the first submit that fails for good no new submit starts:
those in flight are awaited and recorded (they are paid for), then the failure is raised
naming its item.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from itertools import islice
from typing import TYPE_CHECKING, Any

from airflow_flux.exceptions import FluxError, FluxValidationError
from airflow_flux.operators.inputs import describe_inputs, has_s3_inputs

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    from airflow_flux.hooks.flux import FluxHook
    from airflow_flux.models import RequestOptions
    from airflow_flux.operators.inputs import InputResolver

#: Submits (or input checks) in flight at once from the worker (each is one short HTTP call).
SUBMIT_CONCURRENCY = 8
#: Payloads pinned per chunk.
PIN_CHUNK = 256
#: Seconds between progress lines while submitting.
PROGRESS_INTERVAL = 10.0


def pin_each(
    resolver: InputResolver, payloads: Iterable[tuple[int, dict[str, Any]]], *, log: Any
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each ``(index, payload)`` with its ``s3://`` inputs checked and pinned, in order, a chunk at a
    time (a window's batch may be 100,000: what is held is one chunk); refused naming the item."""
    started = time.monotonic()
    stream = iter(payloads)
    with ThreadPoolExecutor(max_workers=SUBMIT_CONCURRENCY) as pool:
        while chunk := list(islice(stream, PIN_CHUNK)):
            futures = [(i, p, pool.submit(resolver.pin, p) if has_s3_inputs(p) else None) for i, p in chunk]
            for index, payload, future in futures:
                try:
                    yield index, (future.result() if future is not None else payload)
                except FluxValidationError as exc:
                    for _, _, other in futures:
                        if other is not None:
                            other.cancel()
                    raise FluxValidationError(f"requests[{index}]: {exc}", errors=exc.errors) from None
    log.info("FLUX batch: s3:// inputs checked in %.1fs; nothing paid for yet", time.monotonic() - started)


def pin_all(resolver: InputResolver, payloads: list[dict[str, Any]], *, log: Any) -> list[dict[str, Any]]:
    """Every payload with its ``s3://`` inputs checked and pinned; refused naming the item."""
    return [pinned for _, pinned in pin_each(resolver, enumerate(payloads), log=log)]


def submit_all(
    hook: FluxHook,
    endpoint: str,
    payloads: list[dict[str, Any]],
    indices: list[int],
    *,
    options: RequestOptions,
    resolver: InputResolver | None,
    record: Callable[[int, dict[str, Any]], Any],
    on_failure: Callable[..., None],
    log: Any,
) -> dict[int, dict[str, Any]]:
    """Submit ``indices`` in order, a few at a time; each handle recorded (``record``) as its submit returns.

    :param on_failure: called once, ``(index, in_flight=n)``, when the first failed submit is seen.
    """
    if not indices:
        return {}

    def submit(index: int) -> dict[str, Any]:
        payload = payloads[index]
        sent = resolver.resolve(payload) if resolver is not None and has_s3_inputs(payload) else payload
        handle = hook.submit(sent, endpoint=endpoint, options=options).model_dump()
        handle["inputs"] = describe_inputs(payload)  # the pinned s3:// URIs, never a presigned URL
        return handle

    handles: dict[int, dict[str, Any]] = {}
    failure: tuple[int, BaseException] | None = None
    queue = iter(indices)
    started = last_progress = time.monotonic()
    width = min(SUBMIT_CONCURRENCY, len(indices))
    with ThreadPoolExecutor(max_workers=width) as pool:
        running: dict[Future[dict[str, Any]], int] = {}
        while True:
            # Refill up to the pool's width only: a queued submit could not be taken back.
            while failure is None and len(running) < width and (index := next(queue, None)) is not None:
                running[pool.submit(submit, index)] = index
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index = running.pop(future)
                if (exc := future.exception()) is not None:
                    if failure is None:
                        failure = (index, exc)
                        on_failure(index, in_flight=len(running))
                    continue
                handles[index] = future.result()
                record(index, handles[index])  # the task state is written from this thread only
            if time.monotonic() - last_progress >= PROGRESS_INTERVAL:
                last_progress = time.monotonic()
                log.info("FLUX batch: submitted %d of %d", len(handles), len(indices))
    log.info("FLUX batch: submitted %d request(s) in %.1fs", len(handles), time.monotonic() - started)
    if failure is not None:
        index, exc = failure
        raise FluxError(
            f"requests[{index}]: the submit failed: {exc}. {len(handles)} request(s) submitted by this try are "
            f"recorded (a retry does not pay for them again); {len(indices) - len(handles) - 1} not submitted"
        ) from exc
    return handles


def read_dict(store: Any, key: str) -> dict[str, Any] | None:
    """A dict stored under ``key`` of a task state store, or None (no store, nothing stored, or not a dict)."""
    value = store.get(key) if store is not None else None
    return dict(value) if isinstance(value, Mapping) else None


def first_event(trigger: Any) -> dict[str, Any]:
    """Run ``trigger`` in this process (no triggerer) until its first event's payload."""

    async def first() -> dict[str, Any]:
        async for event in trigger.run():
            return dict(event.payload)
        raise FluxError("The FLUX batch trigger ended without an event")

    return asyncio.run(first())
