"""The polling schedule: how long to wait before the next status check.

One schedule for the trigger's polling fallback and the worker's blocking wait
(:meth:`FluxHook.wait_for_completion`).
"""

from __future__ import annotations


def next_poll_interval(
    polls: int,
    elapsed: float,
    *,
    initial: float,
    maximum: float,
    queue_position: int | None = None,
) -> float:
    """Seconds to the next status poll.

    Starts at ``initial`` and grows by half each poll, but never beyond a tenth of the time
    already waited: a request that has run 10 minutes will not finish in the next second,
    yet one that finishes is then noticed at most 10 % late (growth by poll count alone
    noticed long generations far later: ``bench/RESULTS.md``, detection). Far back in the
    queue there is no point asking often either. Capped at ``maximum``.
    """
    interval = min(initial * 1.5**polls, max(initial, 0.1 * elapsed))
    if queue_position:
        interval = max(interval, 0.5 * queue_position)
    return max(0.05, min(interval, maximum))
