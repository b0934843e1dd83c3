"""Server-Sent Events, as fal's status stream sends them: ``data:`` lines, ``: ping`` comments.

Only ``data:`` fields carry anything for fal (``event:``, ``id:`` and ``retry:`` are unused);
an event ends at a blank line. A line-at-a-time parser rather than an async generator: the
hook's read loop stays the only frame a waiting stream holds, which thousands of waits in
one triggerer each keep alive.
"""

from __future__ import annotations


class SSEParser:
    """Feed it the raw lines of a ``text/event-stream`` body; it returns each event's data."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, raw_line: bytes) -> str | None:
        """The data of the event that ``raw_line`` ends, or None while an event is incomplete."""
        line = raw_line.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith(":"):
            return None  # comment (fal's ": ping" keep-alive)
        if line.startswith("data:"):
            self._data.append(line[5:].lstrip(" "))
            return None
        if line or not self._data:
            return None  # other fields (event:, id:, retry:) are unused by fal
        event, self._data = "\n".join(self._data), []
        return event
