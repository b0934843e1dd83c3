"""The job clock: :class:`Job`, a submitted request whose state follows from the time.

Job state is a pure function of wall-clock time since submit (queue, then run), so
no background task runs per job: polling computes the state, and SSE streams sleep
until the next moment their output can change. That keeps many open streams cheap
on one event loop (how many was measured: see bench/RESULTS.md and bench/ANALYSIS.md).

Queue position, log lines and the outcome (completed, cancelled, timed out) are derived
the same way, from the submit time, the scenario and the times of cancel or deadline.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_flux.emulator.scenarios import Scenario

IN_QUEUE = "IN_QUEUE"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
_STEPS = 28


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
