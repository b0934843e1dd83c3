"""Concurrency limits per account: when each job of an account leaves the queue.

fal runs at most N requests of an account at once (2 for new accounts, up to 40) and keeps
the rest ``IN_QUEUE``, first in first out; nothing is rejected for concurrency. With
``FluxEmulator(concurrency=N)`` the emulator does the same for every account, an account
being one ``Authorization`` header value (``None``: requests without one).

The job clock stays a function of time. An :class:`Account` computes the start of a job when
it is submitted, and recomputes its waiting jobs whenever something the schedule depends on
changes: a cancel, or an edit whose inputs finished loading (its end is known from then on,
and is at once if one failed). Between those moments every state, position and log line
follows from the stored times, as without a limit. Only jobs that have not started move,
and only earlier (or from "not known" to a time): the past is never rewritten.

The schedule at time ``now``, over the account's jobs that have not ended:

* a job that has started holds its slot until it ends (a ``never_complete`` job, or an edit
  whose inputs are still loading: until further notice);
* the waiting ones, in submit order, each take the slot that frees first, and start at the
  later of that moment and their own ``submitted_at + queue_seconds`` (never before
  ``now``; a job held at a closed queue gate: not known until the gate is released). With one ``queue_seconds`` for all, they start in submit order;
* a waiting job whose start would come after its ``X-Fal-Request-Timeout`` deadline times
  out at the deadline and leaves its slot to the next one; if its start is not known yet
  (every slot held until further notice), it times out at the deadline unless a slot frees
  before;
* a waiting job's ``queue_position`` is the number of jobs submitted before it that are still
  waiting: each leaves the queue at its start (or its deadline, if it times out; a cancelled
  one at once), so the position falls as the jobs ahead start.
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

    from airflow_flux.emulator.jobs import Job


class Account:
    """The jobs of one account that had not ended when it was last scheduled, in submit order."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the concurrency limit must be at least 1")
        self.limit = limit
        self.jobs: list[Job] = []

    def add(self, job: Job, now: float) -> None:
        """Queue a new job behind the others and give it its start."""
        job.limited = True
        self.jobs.append(job)
        self.schedule(now)

    def schedule(self, now: float) -> list[Job]:
        """Recompute the start of every waiting job; returns them (whoever watches them
        should look again)."""
        active: list[Job] = []
        slot_free: list[float] = []  # when each running job frees its slot
        waiting: list[Job] = []
        for job in self.jobs:
            end = job.end_time
            if end is not None and end <= now:
                continue  # ended (or cancelled / timed out in the queue): no slot, no place
            active.append(job)
            start = job.scheduled_start
            if start is not None and start <= now:
                slot_free.append(math.inf if end is None else end)
                job.ahead_leaves, job.ahead_count = [], 0
            else:
                waiting.append(job)
        self.jobs = active
        # Free slots are free from now on; the running jobs' slots free when they end.
        slot_free.extend([now] * max(0, self.limit - len(slot_free)))
        heapq.heapify(slot_free)
        leaves: list[float] = []  # when each waiting job leaves the queue, in submit order
        for index, job in enumerate(waiting):
            job.ahead_leaves, job.ahead_count = leaves, index
            free = heapq.heappop(slot_free)
            ready = job.ready_at  # None: held at its queue gate (``Scenario.hold_queue``)
            start = max(math.inf if ready is None else ready, free)
            if job.start_by is not None and start > job.start_by:
                # It would start too late: it times out at its deadline and never runs.
                job.scheduled_start = None
                job.deadline_at = job.start_by
                heapq.heappush(slot_free, free)
                leaves.append(job.start_by)
                continue
            job.deadline_at = None
            job.scheduled_start = None if math.isinf(start) else start
            end = job.end_time
            heapq.heappush(slot_free, math.inf if end is None or job.scheduled_start is None else end)
            leaves.append(start)
        return waiting


def peak_running(jobs: Iterable[Job], now: float) -> int:
    """The most of ``jobs`` that were IN_PROGRESS at one moment up to ``now``.

    Derived from the jobs' start and end times (a job runs from its start, inclusive, to its
    end, exclusive), so it holds for every moment, not only the ones a client happened to poll.
    """
    events: list[tuple[float, int]] = []
    for job in jobs:
        start = job.queue_end
        if start is None or start > now or not job.started:
            continue
        events.append((start, 1))
        end = job.end_time
        if end is not None and end <= now:
            events.append((end, -1))
    running = peak = 0
    # At equal times ends come first: a slot freed at t is taken by a job starting at t.
    for _, delta in sorted(events):
        running += delta
        peak = max(peak, running)
    return peak
