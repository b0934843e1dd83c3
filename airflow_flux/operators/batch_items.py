"""What a batch writes: one item per request, and a window's checkpoints of them.

:func:`result_line` is a request's item as :class:`~airflow_flux.operators.FluxBatchGenerateOperator`
returns it (or writes it as a line of its results file). A window
(:mod:`~airflow_flux.operators.batch_window`) keeps each finished request's line in a
*checkpoint* until the end: a few hundred lines per S3 object next to the results file, or a
few dozen per task state value when the batch has no results bucket.
"""

from __future__ import annotations

import json
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from airflow_flux.exceptions import FluxError, FluxTimeoutError
from airflow_flux.identity import StoredRequest
from airflow_flux.models import cost_usd
from airflow_flux.operators.inputs import describe_inputs
from airflow_flux.results import list_parts, read_part, write_part

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_flux.families.common import Prices
    from airflow_flux.operators.batch_window import BatchWindow
    from airflow_flux.results import Tally
    from airflow_flux.state import TaskState

#: The window's marker: written before its first submit (``slots``, ``parts`` for task state checkpoints).
WINDOW_KEY = "flux_batch/window"
#: A submitted request's record, until its line is in a checkpoint.
SLOT_KEY = "flux_batch/slot/{slot}"
#: A checkpoint kept in the task state (a batch without a results bucket).
PART_KEY = "flux_batch/part/{seq}"
#: Finished lines per checkpoint: in S3, and in the task state (whose values Airflow 3.3 caps
#: at 64 KiB by default; a line is about 500 bytes).
S3_CHECKPOINT_LINES = 200
STATE_CHECKPOINT_LINES = 50
#: Fields of a checkpoint line that are not the result's.
CHECKPOINT_FIELDS = ("fingerprint", "max_tries", "retryable")


class Checkpoints(Protocol):
    """Where a window keeps its finished lines: in order, each part written whole."""

    lines_per_part: int
    #: Whether a write is slow I/O, run in a thread (else in the window's own thread).
    in_thread: bool

    def parts(self) -> list[int]: ...

    def read(self, seq: int) -> Iterator[dict[str, Any]]: ...

    def write(self, seq: int, lines: list[dict[str, Any]]) -> None: ...


class S3Checkpoints:
    """Checkpoints next to the results file (:func:`airflow_flux.results.write_part`)."""

    lines_per_part = S3_CHECKPOINT_LINES
    in_thread = True

    def __init__(self, client: Any, bucket: str, key: str, owner: Mapping[str, Any]) -> None:
        self.client, self.bucket, self.key, self.owner = client, bucket, key, owner
        self._keys: dict[int, str] = {}

    def parts(self) -> list[int]:
        self._keys = dict(list_parts(self.client, self.bucket, self.key, owner=self.owner))
        return sorted(self._keys)

    def read(self, seq: int) -> Iterator[dict[str, Any]]:
        return read_part(self.client, self.bucket, self._keys[seq], owner=self.owner)

    def write(self, seq: int, lines: list[dict[str, Any]]) -> None:
        write_part(self.client, self.bucket, self.key, seq, lines, owner=self.owner)


class StateCheckpoints:
    """Checkpoints in the task state: for batches small enough to return their results as a list."""

    lines_per_part = STATE_CHECKPOINT_LINES
    in_thread = False

    def __init__(self, store: TaskState | None) -> None:
        self.store = store

    def parts(self) -> list[int]:
        marker = self.store.get(WINDOW_KEY) if self.store is not None else None
        return list(range(int(marker.get("parts") or 0))) if isinstance(marker, Mapping) else []

    def read(self, seq: int) -> Iterator[dict[str, Any]]:
        value = self.store.get(PART_KEY.format(seq=seq)) if self.store is not None else None
        return iter([dict(line) for line in value] if isinstance(value, list) else [])

    def write(self, seq: int, lines: list[dict[str, Any]]) -> None:
        if self.store is None:
            return
        self.store.set(PART_KEY.format(seq=seq), lines)
        marker = self.store.get(WINDOW_KEY)
        self.store.set(WINDOW_KEY, {**(dict(marker) if isinstance(marker, Mapping) else {}), "parts": seq + 1})


def result_line(
    index: int,
    payload: Mapping[str, Any],
    outcome: Mapping[str, Any],
    *,
    endpoint: str,
    flux_conn_id: str,
    prices: Prices,
    inputs: Any = None,
) -> dict[str, Any]:
    """One request's item, as the batch returns it (or writes it as a line of its results file).

    :param outcome: ``{"status": "completed", "request_id", "result": {...}}``, or a failed
        or pending one with ``error``, ``error_type``, ``status_code``.
    :param inputs: the ``s3://`` inputs as pinned when it was paid for (default: the payload's).
    """
    # flux_conn_id: the copy to S3 downloads the images under this connection's allowed hosts.
    common = {
        "index": index,
        "prompt": payload.get("prompt"),
        "endpoint": endpoint,
        "flux_conn_id": flux_conn_id,
        "inputs": inputs if inputs is not None else describe_inputs(payload),
    }
    if outcome.get("status") == "completed":
        result = dict(outcome.get("result") or {})
        result["cost_usd"] = cost_usd(
            endpoint, result.get("images") or [], billable_units=result.get("billable_units"), prices=prices
        )
        return {**result, **common, "request_id": outcome.get("request_id"), "status": "completed"}
    error = outcome.get("error")
    if outcome.get("status") == "pending":
        error = error or "not finished within wait_timeout"
    return {
        **common,
        "request_id": outcome.get("request_id"),
        "status": "failed",
        "error": error,
        "error_type": outcome.get("error_type"),
        "status_code": outcome.get("status_code"),
    }


def check_failures(tally: Tally, failed: Sequence[Mapping[str, Any]], *, allow_failures: int, timed_out: bool) -> None:
    """Fail the task, naming the first ``failed`` lines, when more than ``allow_failures`` failed."""
    if tally.failed <= allow_failures:
        return
    listed = "; ".join(
        f"requests[{r['index']}] ({r.get('request_id')}): {r.get('error_type') or 'error'}: {r.get('error')}"
        for r in failed[:10]
    )
    error = FluxTimeoutError if timed_out else FluxError
    raise error(
        f"{tally.failed} of {tally.requests} FLUX request(s) failed (allow_failures={allow_failures}): "
        f"{listed}{' ...' if tally.failed > 10 else ''}"
    )


def results_place(context: Context, key: str | None, aws_conn_id: str | None) -> tuple[Any, str, dict[str, Any]]:
    """The S3 client, the results key (``key`` or the task instance's default) and its owner."""
    from airflow.providers.amazon.aws.hooks.s3 import S3Hook

    from airflow_flux.results import default_results_key

    ti = context["ti"]
    owner = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "map_index": ti.map_index}
    return S3Hook(aws_conn_id=aws_conn_id).get_conn(), key or default_results_key(owner), owner


class LineStore:
    """Lines (or pinned payloads) by index on disk (a temporary SQLite file); the last kept wins.

    A window's lines finish in any order and may number 100,000: composing the results file
    in input order must not hold them in memory.
    """

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="flux-batch-")
        self.db = sqlite3.connect(Path(self._dir.name) / "lines.sqlite")
        self.db.execute("CREATE TABLE line (idx INTEGER PRIMARY KEY, body TEXT NOT NULL)")

    def keep(self, index: int, line: Mapping[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO line (idx, body) VALUES (?, ?)", (index, json.dumps(line)))

    def get(self, index: int) -> dict[str, Any]:
        (body,) = self.db.execute("SELECT body FROM line WHERE idx = ?", (index,)).fetchone()
        return dict(json.loads(body))

    def in_order(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for index, body in self.db.execute("SELECT idx, body FROM line ORDER BY idx"):
            yield index, json.loads(body)

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()


def resume_window(w: BatchWindow) -> dict[int, dict[str, Any]]:
    """What earlier tries left: lines kept (finished for good), and the handles to await again."""
    marker = w.store.get(WINDOW_KEY) if w.store is not None else None
    if not isinstance(marker, Mapping) or not w.reuse:
        w.free.extend(range(w.slots))
        if isinstance(marker, Mapping):  # reuse off: an earlier try's checkpoints are not overwritten, nor read
            w.next_seq = max(w.checkpoints.parts(), default=-1) + 1
        return {}
    failed_ids: set[str] = set()  # requests that failed transiently: submitted again, not awaited
    kept = 0
    for seq in w.checkpoints.parts():
        w.next_seq = seq + 1
        for line in w.checkpoints.read(seq):
            index = line.get("index")
            if not isinstance(index, int) or not 0 <= index < w.count:
                continue
            if line.get("max_tries") != w.max_tries or line.get("fingerprint") != w.fingerprint(index):
                continue  # another input at this index now, or from before a clear: not this request's
            if line.get("status") == "failed" and line.get("retryable"):
                failed_ids.add(str(line.get("request_id")))
                continue
            if not w.done[index]:
                kept += 1
                w.count_line(line)
            w.done[index] = 1
            w.keep_line(index, line)
    best: dict[int, tuple[int, StoredRequest]] = {}
    for slot in range(max(int(marker.get("slots") or 0), w.slots)):
        stored = StoredRequest.load(w.store.get(SLOT_KEY.format(slot=slot))) if w.store else None
        index = stored.handle.get("index") if stored is not None else None
        if stored is None or not isinstance(index, int) or not 0 <= index < w.count or w.done[index]:
            continue
        if str(stored.handle.get("request_id")) in failed_ids or stored.max_tries != w.max_tries:
            continue
        if stored.identity.fingerprint != w.fingerprint(index):
            w.log.warning("requests[%d] changed since an earlier try paid for it: submitting it anew", index)
            continue
        if index not in best or (best[index][1].try_number or 0) < (stored.try_number or 0):
            best[index] = (slot, stored)
    awaited = {index: dict(stored.handle) for index, (_, stored) in best.items()}
    # An awaited request keeps its slot (an earlier try may have had more of them).
    w.slot_of = {index: slot for index, (slot, _) in best.items()}
    taken = set(w.slot_of.values())
    w.free.extend(s for s in range(w.slots) if s not in taken)
    w.log.info(
        "FLUX batch: %d request(s) kept from earlier tries (finished), %d paid for and awaited again",
        kept,
        len(awaited),
    )
    return awaited


def window_lines(w: BatchWindow) -> Iterator[dict[str, Any]]:
    """Every request's line in input order: finished ones from the checkpoints, the others said why."""
    kept = w.kept.in_order()
    row = next(kept, None)
    for index in range(w.count):
        if row is not None and row[0] == index:
            yield row[1]
            row = next(kept, None)
            continue
        payload = w.payload_of(index)
        if index in w.unfinished:
            handle = w.unfinished[index]
            outcome = {"status": "pending", "request_id": handle.get("request_id"), "error": handle.get("error")}
        elif index in w.not_paid:
            outcome = w.not_paid[index]
        else:
            why = "wait_timeout passed first" if w.timed_out else "an earlier submit failed"
            outcome = {"status": "failed", "error": f"not submitted: {why}"}
        yield result_line(
            index,
            payload,
            outcome,
            endpoint=w.endpoint,
            flux_conn_id=w.flux_conn_id,
            prices=w.price,
            inputs=w.unfinished.get(index, {}).get("inputs"),
        )
