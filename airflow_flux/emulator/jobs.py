"""The job clock: :class:`Job`, a submitted request whose state follows from the time.

Job state is a pure function of wall-clock time since submit (queue, then run), so
no background task runs per job: polling computes the state, and SSE streams sleep
until the next moment their output can change. That keeps many open streams cheap
on one event loop (how many was measured: see bench/RESULTS.md and bench/ANALYSIS.md).

Queue position, log lines and the outcome (completed, cancelled, timed out, input error)
are derived the same way, from the submit time, the scenario and the times of cancel,
deadline or input fetch.

Edit and multi jobs also wait for their input images: they are fetched when the job
leaves the queue (see ``fetch``), and the job cannot complete before they are in. Until
then the job has no known end; once they are, it ends at the later of its natural end and
the fetch, or, if an input could not be loaded, as soon as the fetch failed.

Under a concurrency limit (``FluxEmulator(concurrency=N)``) a job leaves the queue when its
account's schedule says (see ``accounts``): the schedule stores its start (``scheduled_start``,
None while not known) and when each job ahead of it leaves the queue (``ahead_leaves``), and
the job's state and ``queue_position`` follow from those times in the same way.

A test can hold a job in a state until it says so (``Scenario.hold_queue``/``hold_run``): the
job's :class:`Gate` has no release time while closed, so the job's start (or end) is not
known, as above; once released, it follows from the release time like any other time.
``Scenario.hold_submit`` holds the submit's answer instead: the job is accepted (paid) and
its clock runs, but the client hears of it only once the gate is released.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_flux.emulator.scenarios import InputFetch, Scenario

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
_STEPS = 28
# How often a stream re-checks a job whose inputs are still being fetched.
_INPUT_POLL_SECONDS = 0.05


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(eq=False)
class Gate:
    """A named hold (``Scenario.hold_queue``/``hold_run``/``hold_submit``): closed while
    ``released_at`` is None. ``opened`` is set on release (on the server's loop): the submit
    answers it holds wait for it."""

    name: str
    released_at: float | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def closed(self) -> bool:
        return self.released_at is None


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
    #: ``X-Fal-Queue-Priority`` (recorded only: it does not change the timing).
    priority: str = "normal"
    #: ``X-Fal-Request-Timeout`` in seconds, as sent (None: not sent).
    request_timeout: float | None = None
    #: Raw ``X-Fal-Store-IO`` and ``X-Fal-Object-Lifecycle-Preference`` values (None: not sent).
    store_io: str | None = None
    object_lifecycle_preference: str | None = None
    #: ``(field label, loc, url)`` of each input image (edit/multi endpoints), in order.
    input_refs: list[tuple[str, list[str | int], str]] = field(default_factory=list)
    #: What was fetched for each input, in input order; filled when the fetch is over.
    input_fetches: list[InputFetch] = field(default_factory=list)
    #: When every input was in (or one had failed); None while fetching or not yet started.
    inputs_done_at: float | None = None
    #: fal's 422 ``detail`` items for the inputs that could not be loaded (empty: none).
    input_errors: list[dict[str, Any]] = field(default_factory=list)
    #: The encoded input images that loaded, in order (what edit outputs are derived from).
    input_images: list[bytes] = field(default_factory=list, repr=False)
    #: The ``Authorization`` header value of the submit: the account it counts against.
    account: str | None = field(default=None, repr=False)
    #: True when the account's concurrency limit decides the start (see ``accounts``).
    limited: bool = False
    #: Under the limit: when the job leaves the queue (None: not known yet, or never).
    scheduled_start: float | None = None
    #: Under the limit: ``submitted_at`` + ``X-Fal-Request-Timeout`` (None: not sent).
    start_by: float | None = None
    #: Under the limit, while queued: when each waiting job of the account leaves the queue
    #: (``inf``: not known yet), in submit order; the first ``ahead_count`` are ahead of this
    #: one. The list is shared by the account's waiting jobs.
    ahead_leaves: list[float] = field(default_factory=list, repr=False)
    ahead_count: int = 0
    #: The gates of ``Scenario.hold_queue`` / ``hold_run`` / ``hold_submit`` as they were at
    #: submit (None: none).
    queue_gate: Gate | None = None
    run_gate: Gate | None = None
    submit_gate: Gate | None = None
    # Woken on cancel or shutdown so sleeping SSE streams react at once; replaced and set by
    # :meth:`notify` when the job's times change.
    wakeup: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def notify(self) -> None:
        """Wake whoever sleeps on :attr:`wakeup` (streams, the input fetch) to look again."""
        event, self.wakeup = self.wakeup, asyncio.Event()
        event.set()

    @property
    def ready_at(self) -> float | None:
        """When the job may leave the queue by its own queue time and queue gate (None: its
        gate is closed); under a concurrency limit it also waits for a slot."""
        ready = self.submitted_at + self.queue_seconds
        gate = self.queue_gate
        if gate is None:
            return ready
        return None if gate.released_at is None else max(ready, gate.released_at)

    @property
    def queue_end(self) -> float | None:
        """When the job leaves the queue (None: not known yet, or it never starts)."""
        if self.limited:
            return self.scheduled_start
        return self.ready_at

    @property
    def natural_end(self) -> float | None:
        """When the job completes if nothing interrupts it (None: never, or not known yet
        because its input images are still being fetched)."""
        start = self.queue_end
        if self.scenario.never_complete or start is None:
            return None
        run_end = start + self.run_seconds
        if self.run_gate is not None:
            released = self.run_gate.released_at
            if released is None:
                return None
            run_end = max(run_end, released)
        if not self.input_refs:
            return run_end
        done = self.inputs_done_at
        if done is None:
            return None
        # fal fails the request as soon as an input cannot be loaded.
        return done if self.input_errors else max(run_end, done)

    @property
    def inputs_pending(self) -> bool:
        """True while the job has input images that are not fetched yet."""
        return bool(self.input_refs) and self.inputs_done_at is None

    @property
    def started(self) -> bool:
        """Whether the job left the queue (or will, if it has not ended before)."""
        end = self.end_time
        start = self.queue_end
        if start is None:
            return end is None
        return end is None or end > start

    @property
    def end_time(self) -> float | None:
        """When the job is (or will be) COMPLETED, whatever the reason."""
        times = [t for t in (self.natural_end, self.cancelled_at, self.deadline_at) if t is not None]
        return min(times) if times else None

    @property
    def outcome(self) -> str:
        """``"ok"``, ``"cancelled"``, ``"timeout"`` or ``"input_error"``: how the job ends (or will end)."""
        end = self.end_time
        if end is not None and end == self.cancelled_at:
            return "cancelled"
        if end is not None and end == self.deadline_at:
            return "timeout"
        if self.input_errors and end is not None:
            return "input_error"
        return "ok"

    @property
    def completed_at(self) -> float | None:
        """``time.time()`` at which the job became COMPLETED, or None if it has not yet."""
        end = self.end_time
        return end if end is not None and end <= time.time() else None

    def held_at(self, now: float) -> str | None:
        """The closed gate that holds the job in its present state at ``now`` (None: none)."""
        if self.submit_gate is not None and self.submit_gate.closed:
            return self.submit_gate.name  # accepted (paid), its answer not sent yet
        state = self.state_at(now)
        gate = {IN_QUEUE: self.queue_gate, IN_PROGRESS: self.run_gate}.get(state)
        return gate.name if gate is not None and gate.closed else None

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
        start = self.queue_end
        if start is None or now < start:
            return IN_QUEUE
        return IN_PROGRESS

    def queue_position_at(self, now: float) -> int:
        """Counts down from the scenario's position to 0 in equal steps over the queue time;
        under a concurrency limit, plus the account's jobs ahead that have not left the queue."""
        position = 0
        initial = self.scenario.queue_position
        if initial > 0 and self.queue_seconds > 0:
            slot = self.queue_seconds / (initial + 1)
            position = max(0, initial - int((now - self.submitted_at) / slot))
        if self.ahead_count:
            position += sum(1 for t in itertools.islice(self.ahead_leaves, self.ahead_count) if t > now)
        return position

    def _log_schedule(self) -> list[tuple[float, str]]:
        start = self.queue_end
        if start is None:
            return []
        schedule = [
            (start, "Starting generation"),
            (start + self.run_seconds * 10 / _STEPS, f"Step 10/{_STEPS}"),
            (start + self.run_seconds * 20 / _STEPS, f"Step 20/{_STEPS}"),
        ]
        if self.inputs_done_at is not None and not self.input_errors:
            count = len(self.input_refs)
            schedule.append((self.inputs_done_at, f"Loaded {count} input image{'s' if count > 1 else ''}"))
        natural = self.natural_end
        if natural is not None and not self.input_errors:
            schedule.append((natural, "Generation complete"))
        return sorted(schedule, key=lambda item: item[0])

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
        levels: dict[str, str] = {}
        if self.outcome == "input_error" and end is not None and now >= end:
            fields = ", ".join(str(f.field) for f in self.input_fetches if not f.ok)
            message = f"Could not load input image {fields}"
            entries = [(t, m) for t, m in entries if t < end] + [(end, message)]
            levels[message] = "ERROR"
        return [
            {"message": msg, "level": levels.get(msg, "INFO"), "source": "user", "timestamp": _iso(t)}
            for t, msg in entries
        ]

    def next_change(self, now: float, with_logs: bool) -> float | None:
        """Earliest time after ``now`` at which the status body can change."""
        candidates: list[float] = []
        end = self.end_time
        if end is not None:
            candidates.append(end)
        start = self.queue_end
        if start is not None:
            candidates.append(start)
        if self.ahead_count:
            ahead = itertools.islice(self.ahead_leaves, self.ahead_count)
            candidates.extend(t for t in ahead if now < t < math.inf)
        initial = self.scenario.queue_position
        if initial > 0 and self.queue_seconds > 0:
            slot = self.queue_seconds / (initial + 1)
            step = int((now - self.submitted_at) / slot) + 1
            if step <= initial:
                candidates.append(self.submitted_at + step * slot)
        if with_logs:
            candidates.extend(t for t, _ in self._log_schedule())
        if self.inputs_pending and start is not None and now >= start:
            candidates.append(now + _INPUT_POLL_SECONDS)
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
        start = self.queue_end
        return 0.0 if start is None else round(max(0.0, end - start), 3)
