"""A batch's requests from a JSON Lines file in S3 (operators/batch_requests.py): moto, the emulator."""

from __future__ import annotations

import json
import tempfile

import pytest

from airflow_flux.emulator import Scenario
from airflow_flux.exceptions import FluxError, FluxValidationError
from airflow_flux.operators import FluxBatchGenerateOperator
from airflow_flux.operators.batch_requests import RequestsFile
from tests.operators.test_batch import _context, _Store
from tests.operators.test_batch_window import _never_more_than, _owned_context

pytestmark = pytest.mark.usefixtures("airflow_db")


def _file(text: str) -> RequestsFile:
    fileobj = tempfile.TemporaryFile()  # noqa: SIM115 (the RequestsFile owns it)
    fileobj.write(text.encode())
    return RequestsFile(fileobj, uri="s3://b/requests.jsonl")


def _upload(s3, lines: list[object], key: str = "in/requests.jsonl") -> str:
    body = "".join(json.dumps(line) + "\n" for line in lines)
    s3.put_object(Bucket=s3.bucket, Key=key, Body=body.encode())
    return f"s3://{s3.bucket}/{key}"


def test_a_requests_file_is_read_by_index_one_line_at_a_time():
    text = '"a fox"\n\n{"prompt": "a cat", "seed": 7}\r\n   \n"a heron, \\"quoted\\""\n{"prompt": "last, no newline"}'
    with _file(text) as items:
        assert len(items) == 4  # blank lines are not requests
        assert items[0] == "a fox"
        assert items[1] == {"prompt": "a cat", "seed": 7}
        assert items[2] == 'a heron, "quoted"'
        assert items[-1] == {"prompt": "last, no newline"}
        assert items[1:3] == [items[1], items[2]]
        assert list(items) == [items[0], items[1], items[2], items[3]]
        with pytest.raises(IndexError):
            items[4]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json: sk-SECRET", r"requests\[1\] \(line 3 of s3://b/requests.jsonl\): not JSON"),
        ("42", r"requests\[1\] \(line 3 of s3://b/requests.jsonl\): a JSON int"),
        ('["a", "list"]', r"requests\[1\] \(line 3 of s3://b/requests.jsonl\): a JSON list"),
    ],
)
def test_a_bad_line_is_refused_naming_its_index_and_line_never_its_content(line, message):
    with _file(f'"a fox"\n\n{line}\n') as items, pytest.raises(FluxValidationError, match=message) as info:
        items[1]
    assert "SECRET" not in str(info.value)


def test_a_window_from_a_file_sends_each_line_once_and_each_result_is_its_lines(emulator, flux_conn, s3):
    lines: list[object] = [f"file fox {i}" for i in range(10)]
    lines[4] = {"prompt": "a seeded file fox", "seed": 41}
    op = FluxBatchGenerateOperator(
        task_id="batch",
        requests=_upload(s3, lines),
        flux_conn_id=flux_conn,
        poll_interval=0.05,
        max_in_flight=3,
        results_s3_bucket=s3.bucket,
    )
    summary = op.execute(_owned_context(_Store()))
    assert (summary["requests"], summary["completed"], summary["failed"]) == (10, 10, 0)
    assert len(emulator.calls(kind="submit")) == 10
    _never_more_than(emulator, 3)
    body = s3.get_object(Bucket=s3.bucket, Key="flux/d/r1/_results/batch.jsonl")["Body"].read()
    results = [json.loads(raw) for raw in body.splitlines()]
    assert [r["index"] for r in results] == list(range(10))
    for result, line in zip(results, lines, strict=True):
        sent = emulator.jobs[result["request_id"]].input
        assert sent["prompt"] == result["prompt"] == (line if isinstance(line, str) else line["prompt"])
    assert emulator.jobs[results[4]["request_id"]].input["seed"] == 41


def test_a_small_batch_from_a_file_waits_at_once_and_reads_the_file_again_after(emulator, flux_conn, s3):
    # At most max_in_flight: submitted at once, awaited (here in the worker), and the file read
    # again when the wait's event is handled (as after a deferral, in another process).
    uri = _upload(s3, ["a small fox", {"prompt": "a small cat", "num_images": 2}])
    op = FluxBatchGenerateOperator(
        task_id="batch", requests=uri, flux_conn_id=flux_conn, poll_interval=0.05, deferrable=False
    )
    results = op.execute(_context())
    assert [(r["prompt"], len(r["images"])) for r in results] == [("a small fox", 1), ("a small cat", 2)]
    assert len(emulator.calls(kind="submit")) == 2


def test_a_line_changed_between_tries_is_sent_anew_and_the_rest_is_kept(emulator, flux_conn, s3):
    # Try 1: requests[3] is refused on submit (for good); what was paid for is recorded. Before
    # try 2 the file is rewritten: requests[0] (completed) and requests[3] changed. The retry
    # sends exactly those two and what try 1 never sent; every result is its own line's.
    emulator.add_scenario(Scenario(submit_errors=[422]), match="refused")
    lines = [f"tried fox {i}" for i in range(8)]
    lines[3] = "a refused fox"
    uri = _upload(s3, lines)
    store = _Store()
    kwargs = {"task_id": "b", "requests": uri, "flux_conn_id": flux_conn, "poll_interval": 0.05, "max_in_flight": 2}
    with pytest.raises(FluxError, match=r"requests\[3\]: the submit failed"):
        FluxBatchGenerateOperator(**kwargs).execute(_context(store))
    paid = {job.input["prompt"] for job in emulator.jobs.values()}
    assert "tried fox 0" in paid and "a refused fox" not in paid
    before = set(emulator.jobs)

    lines[0], lines[3] = "tried fox 0, changed", "a fixed fox"
    _upload(s3, lines)
    results = FluxBatchGenerateOperator(**kwargs).execute(_context(store, try_number=2))
    assert [r["status"] for r in results] == ["completed"] * 8
    sent = [job.input["prompt"] for request_id, job in emulator.jobs.items() if request_id not in before]
    never_sent = {p for p in lines if p not in paid}
    assert sorted(sent) == sorted(never_sent)  # the changed line included, nothing paid for twice
    for result, line in zip(results, lines, strict=True):
        assert emulator.jobs[result["request_id"]].input["prompt"] == result["prompt"] == line


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, r"requests: the JSON Lines file s3://.*/in/requests.jsonl cannot be read"),
        ("\n  \n", r"requests: s3://.*/in/requests.jsonl has no request"),
        ('"fox 0"\n"fox 1"\n{"prompt": "fox 2", "num_images": "many"}\n', r"requests\[2\] \(line 3 of .*\): "),
    ],
)
def test_a_missing_empty_or_bad_file_is_refused_before_any_call(emulator, flux_conn, s3, body, message):
    if body is not None:
        s3.put_object(Bucket=s3.bucket, Key="in/requests.jsonl", Body=body.encode())
    op = FluxBatchGenerateOperator(
        task_id="b", requests=f"s3://{s3.bucket}/in/requests.jsonl", flux_conn_id=flux_conn, max_in_flight=1
    )
    with pytest.raises(FluxValidationError, match=message):
        op.execute(_context())
    assert emulator.requests == []


def test_an_item_of_a_list_that_is_neither_a_prompt_nor_a_dict_is_refused_naming_it(emulator, flux_conn):
    op = FluxBatchGenerateOperator(task_id="b", requests=["a fox", 5], flux_conn_id=flux_conn)
    with pytest.raises(FluxValidationError, match=r"requests\[1\]: a int; each request is a prompt or a dict"):
        op.execute(_context())
    assert emulator.requests == []
