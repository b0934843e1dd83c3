"""What a test scripts and what it observes: :class:`Scenario`, :class:`RecordedRequest`
and :class:`InputFetch`.

A :class:`Scenario` sets timing and faults for the submits it applies to; every HTTP request
the emulator receives is kept as a :class:`RecordedRequest`; every input image the emulator
fetched for an edit is kept as an :class:`InputFetch` on its job. Plain dataclasses, no aiohttp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Values of ``RecordedRequest.kind``.
CALL_KINDS = ("submit", "status", "stream", "result", "cancel", "cdn", "admin", "other")
_API_KINDS = frozenset({"submit", "status", "stream", "result", "cancel"})
# Cancel answers and their HTTP status (also the allowed ``Scenario.cancel_response`` values).
_CANCEL_CODES = {"CANCELLATION_REQUESTED": 202, "ALREADY_COMPLETED": 400, "NOT_FOUND": 404}


@dataclass
class Scenario:
    """Behaviour (timing and faults) for the submits it applies to.

    ``None`` timings fall back to the emulator's defaults. Counted faults
    (``submit_errors``, ``status_errors``, ``result_errors``) are consumed in order.

    ``hold_queue`` / ``hold_run`` name a gate (``FluxEmulator.hold``/``release``): the job
    stays ``IN_QUEUE`` (``IN_PROGRESS``) past its queue (run) time until the gate is
    released, then moves on at once if that time is over. A gate is closed when first named
    and stays open once released, until ``hold`` closes it again for later submits. A test
    that must see a state uses one instead of racing the timers. ``hold_submit`` names a gate
    that holds the submit's *answer*: the job is accepted (paid) when the submit arrives, and
    the client is told so when the gate is released (a slow answer, under the test's control).

    ``stream_event_padding`` adds that many bytes (a ``padding`` field) to every status
    *stream* event, not to polls: one ``data:`` line longer than a client's line limit
    (aiohttp's is 128 KiB), as a long log makes with ``logs=1``.
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
    hold_queue: str | None = None
    hold_run: str | None = None
    hold_submit: str | None = None
    stream_event_padding: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.stream_event_padding, int) or self.stream_event_padding < 0:
            raise ValueError(f"stream_event_padding must be a byte count, 0 or more: {self.stream_event_padding!r}")
        for gate in (self.hold_queue, self.hold_run, self.hold_submit):
            if gate is not None and (not isinstance(gate, str) or not gate):
                raise ValueError(
                    f"hold_queue, hold_run and hold_submit must be gate names (non-empty strings): {gate!r}"
                )
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
    """One HTTP request the emulator received (``status`` is 0 while a stream is open).

    ``statuses`` are the job statuses it reported, in order: one for a status poll, one per
    event for a stream (what a test waits for before it releases a gate).
    """

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
    statuses: list[str] = field(default_factory=list)


@dataclass
class InputFetch:
    """One input image the emulator loaded for a job, the way fal loads it.

    ``http(s)://`` URLs are fetched with a plain GET (no credentials: no ``Authorization``
    header, user info in the URL is dropped); ``data:`` URIs are decoded. ``headers_sent``
    are the headers of the (last) GET as sent, ``authorization_sent`` whether they held an
    ``Authorization`` header. ``error`` is the short reason the input was refused
    (``"HTTP 403"``, ``"not an image: ..."``), None when it loaded as an image.
    """

    #: ``"image_url"`` or ``"image_urls[1]"``.
    field: str
    #: Where fal's 422 names it: ``["body", "image_url"]`` or ``["body", "image_urls", 1]``.
    loc: list[str | int]
    url: str
    scheme: str
    status: int | None = None
    error: str | None = None
    byte_count: int = 0
    sha256: str | None = None
    content_type: str | None = None
    authorization_sent: bool = False
    headers_sent: dict[str, str] = dataclasses.field(default_factory=dict)
    width: int | None = None
    height: int | None = None
    image_format: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the input loaded as an image."""
        return self.error is None
