"""Never pay twice, never attribute an image to the wrong input (issue #21).

Each fault is injected into the real emulator (and a real moto S3 server); what is asserted
is the count of paid submits (jobs the emulator accepted) per prompt, try after try. The
tries share one task state store, as Airflow's ``task_state_store`` is shared by a task's
tries; ``tests/system`` shows the same on a real scheduler.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from airflow_flux.emulator import Scenario
from airflow_flux.exceptions import FluxError, FluxRequestFailedError, FluxValidationError
from airflow_flux.hooks.retry import worth_resubmitting
from airflow_flux.identity import pin_s3_uri, split_s3_input
from airflow_flux.models import KONTEXT_EDIT
from airflow_flux.operators import FluxBatchGenerateOperator, FluxGenerateOperator
from airflow_flux.operators.batch import STATE_KEY
from airflow_flux.operators.batch_submit import SUBMIT_CONCURRENCY
from tests.helpers import task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

POLICY = Scenario(result_error_always=422)  # fal's content policy refusal: final, and may be billed
DISCONNECT = Scenario(complete_error={"error": "Runner disconnected", "error_type": "runner_disconnected"})


class _Store:
    """``task_state_store`` as the task's tries see it: JSON values that outlive a try."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = json.loads(json.dumps(value))


def _context(store: _Store, try_number: int = 1, max_tries: int = 3) -> dict[str, Any]:
    ti = SimpleNamespace(try_number=try_number, max_tries=max_tries, task=None, xcom_push=lambda **kw: None)
    return {"task_state_store": store, "ti": ti}


def _paid(emu) -> Counter[str]:
    """Paid submits (jobs the emulator accepted), per prompt."""
    return Counter(job.input["prompt"] for job in emu.jobs.values())


def _png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(out, format="PNG")
    return out.getvalue()


# -- one classification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status_code", "error_type", "retryable", "expected"),
    [
        (200, "runner_disconnected", False, True),  # completed with an infrastructure error
        (200, "content_policy_violation", False, False),
        (200, None, False, False),  # completed with an error fal does not classify: final
        (422, "content_policy_violation", False, False),  # may be billed: never again
        (503, None, True, True),
        (500, "internal_error", False, True),
        (500, None, False, False),
        (404, None, False, True),  # the API does not know the request
        (404, "result_expired", False, False),  # paid for and completed: not paid again
        (401, None, False, False),
        (403, None, False, False),
    ],
)
def test_one_answer_to_pay_again(status_code, error_type, retryable, expected):
    assert worth_resubmitting(status_code=status_code, error_type=error_type, retryable=retryable) is expected


# -- a batch with a refused submit -------------------------------------------------------------


class _Watched(FluxBatchGenerateOperator):
    """The batch operator, telling the test when it has seen the first failed submit."""

    def __init__(self, *, seen: threading.Event, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen = seen

    def _stop_submitting(self, index: int, *, in_flight: int) -> None:
        super()._stop_submitting(index, in_flight=in_flight)
        self.seen.set()


def test_a_refused_submit_stops_the_batch_and_no_prompt_is_paid_twice(emulator, flux_conn):
    # Items before the refused one are answered at once; the answers of the items after it
    # are held until the operator has said it saw the refusal. Until then they hold their
    # pool slots, so what it starts after the refusal is counted exactly, however slow the
    # machine: at most the slots beside the refused one, none after it said so.
    emulator.add_scenario(Scenario(submit_errors=[400, 400]), match="refused")
    emulator.add_scenario(Scenario(hold_submit="later"), match="later fox")
    prompts = [f"batch fox {i}" if i < 20 else f"later fox {i}" for i in range(40)]
    prompts[20] = "a refused fox"
    store = _Store()

    def run(try_number: int, seen: threading.Event) -> list[dict[str, Any]]:
        op = _Watched(
            task_id="b",
            requests=prompts,
            flux_conn_id=flux_conn,
            deferrable=False,
            poll_interval=0.1,
            max_images=100,
            max_in_flight=40,  # submitted at once (the window's own refusal: test_batch_window.py)
            seen=seen,
        )
        return op.execute(_context(store, try_number))

    for try_number in (1, 2):
        emulator.hold("later")  # closed again for this try's submits
        before = _paid(emulator)
        seen = threading.Event()
        with ThreadPoolExecutor(max_workers=1) as pool:
            task = pool.submit(run, try_number, seen)
            deadline = time.monotonic() + 60
            while not seen.wait(0.05):
                assert not task.done(), task.result()  # ended without seeing the refusal: show why
                assert time.monotonic() < deadline, "the refusal was never reported"
            held = emulator.held("later")
            assert len(held) <= SUBMIT_CONCURRENCY - 1, held
            emulator.release("later")
            with pytest.raises(FluxError, match=r"requests\[20\]: the submit failed: .*HTTP 400") as failure:
                task.result(timeout=60)
        paid = _paid(emulator)
        # Every paid submit is recorded, and none was paid twice.
        recorded = {k for k in store.values if k in {STATE_KEY.format(index=i) for i in range(40)}}
        assert len(recorded) == sum(paid.values()), (try_number, sorted(recorded), paid)
        assert set(paid.values()) <= {1}, paid
        assert "a refused fox" not in paid
        # Try 1 paid for every item before the refused one (all started before it).
        assert {f"batch fox {i}" for i in range(20)} <= set(paid)
        # No new submit started after the refusal was seen: only those in flight beside it
        # (their answers held; some may still have been on their way to the emulator then).
        later = sorted(p for p in paid - before if p.startswith("later fox"))
        assert len(later) <= SUBMIT_CONCURRENCY - 1, (later, held)
        assert "recorded (a retry does not pay for them again)" in str(failure.value)

    # The refusal is gone (the input was fixed upstream): the third try pays for the rest only.
    emulator.add_scenario(Scenario(), match="refused")
    results = run(3, threading.Event())
    assert _paid(emulator) == Counter(prompts)
    assert [r["prompt"] for r in results] == prompts
    for result in results:
        assert result["status"] == "completed"
        assert emulator.jobs[result["request_id"]].input["prompt"] == result["prompt"]


def test_a_missing_s3_input_fails_the_batch_before_anything_is_paid(emulator, flux_conn, s3):
    s3.put_object(Bucket=s3.bucket, Key="in/ok.png", Body=_png((200, 30, 30)), ContentType="image/png")
    requests = [{"prompt": f"edit {i}", "image_url": f"s3://{s3.bucket}/in/ok.png"} for i in range(12)]
    requests[7]["image_url"] = f"s3://{s3.bucket}/in/missing.png"
    op = FluxBatchGenerateOperator(
        task_id="b", requests=requests, endpoint=KONTEXT_EDIT, flux_conn_id=flux_conn, deferrable=False
    )
    with pytest.raises(FluxValidationError, match=r"requests\[7\]: image_url: s3://.*/in/missing.png does not exist"):
        op.execute(_context(_Store()))
    assert emulator.calls(kind="submit") == []


# -- an s3:// input replaced between tries -----------------------------------------------------


def _edit(flux_conn: str, uri: str, **kwargs: Any) -> FluxGenerateOperator:
    return FluxGenerateOperator(
        task_id="edit",
        prompt="make it brighter",
        image_url=uri,
        endpoint=KONTEXT_EDIT,
        flux_conn_id=flux_conn,
        deferrable=False,
        poll_interval=0.1,
        **kwargs,
    )


@pytest.mark.parametrize("versioned", [False, True], ids=["etag", "version"])
@pytest.mark.parametrize("delivery", ["presigned_url", "data_uri"])
def test_a_replaced_input_is_paid_for_again_an_unchanged_one_is_reused(emulator, flux_conn, s3, versioned, delivery):
    if versioned:
        s3.put_bucket_versioning(Bucket=s3.bucket, VersioningConfiguration={"Status": "Enabled"})
    uri = f"s3://{s3.bucket}/in/v.png"
    old, new = _png((200, 30, 30)), _png((30, 30, 200))
    put = s3.put_object(Bucket=s3.bucket, Key="in/v.png", Body=old, ContentType="image/png")
    store = _Store()

    first = _edit(flux_conn, uri, input_delivery=delivery).execute(_context(store, 1))
    pinned = pin_s3_uri(s3.bucket, "in/v.png", version_id=put.get("VersionId"), etag=put["ETag"])
    assert first["inputs"] == [pinned]
    assert ("?versionId=" if versioned else "?etag=") in pinned
    # Unchanged: the retry reuses try 1's request (its result was kept: not even a status call).
    calls = len(emulator.requests)
    again = _edit(flux_conn, uri, input_delivery=delivery).execute(_context(store, 2))
    assert again["request_id"] == first["request_id"] and len(emulator.jobs) == 1
    assert [c.kind for c in emulator.requests[calls:]] == []

    # Replaced after try 2 paid: try 3 is a new request, made from the new bytes.
    put = s3.put_object(Bucket=s3.bucket, Key="in/v.png", Body=new, ContentType="image/png")
    third = _edit(flux_conn, uri, input_delivery=delivery).execute(_context(store, 3))
    assert third["request_id"] != first["request_id"] and len(emulator.jobs) == 2
    assert third["inputs"] == [pin_s3_uri(s3.bucket, "in/v.png", version_id=put.get("VersionId"), etag=put["ETag"])]
    fetched = {rid: [f.sha256 for f in job.input_fetches] for rid, job in emulator.jobs.items()}
    assert fetched[first["request_id"]] == [hashlib.sha256(old).hexdigest()]
    assert fetched[third["request_id"]] == [hashlib.sha256(new).hexdigest()]


def test_a_pinned_input_that_was_replaced_is_refused_before_any_call(emulator, flux_conn, s3):
    put = s3.put_object(Bucket=s3.bucket, Key="in/p.png", Body=_png((1, 2, 3)), ContentType="image/png")
    pinned = pin_s3_uri(s3.bucket, "in/p.png", etag=put["ETag"])
    assert split_s3_input(pinned) == (s3.bucket, "in/p.png", None, put["ETag"].strip('"'))
    s3.put_object(Bucket=s3.bucket, Key="in/p.png", Body=_png((3, 2, 1)), ContentType="image/png")
    with pytest.raises(FluxValidationError, match=r"image_url: .* was replaced"):
        _edit(flux_conn, pinned).execute(_context(_Store()))
    assert emulator.calls(kind="submit") == []


# -- a single request's retry: final, transient, result kept ------------------------------------


def _generate(flux_conn: str, prompt: str) -> FluxGenerateOperator:
    return FluxGenerateOperator(
        task_id="g", prompt=prompt, flux_conn_id=flux_conn, deferrable=False, poll_interval=0.1, wait_timeout=30
    )


def test_a_final_refusal_is_not_paid_for_again_by_a_retry(emulator, flux_conn):
    emulator.add_scenario(POLICY, match="policy")
    store = _Store()
    with pytest.raises(FluxRequestFailedError, match="content_policy_violation"):
        _generate(flux_conn, "a policy fox").execute(_context(store, 1))
    with pytest.raises(FluxRequestFailedError, match=r"refused for good .*content_policy_violation.*HTTP 422"):
        _generate(flux_conn, "a policy fox").execute(_context(store, 2))
    assert _paid(emulator) == Counter({"a policy fox": 1})
    # A clear (max_tries raised) still starts fresh.
    with pytest.raises(FluxRequestFailedError):
        _generate(flux_conn, "a policy fox").execute(_context(store, 3, max_tries=6))
    assert _paid(emulator) == Counter({"a policy fox": 2})


def test_a_transient_failure_is_paid_for_again(emulator, flux_conn):
    emulator.add_scenario(DISCONNECT, match="disconnect")
    store = _Store()
    with pytest.raises(FluxRequestFailedError, match="runner_disconnected"):
        _generate(flux_conn, "a disconnect fox").execute(_context(store, 1))
    emulator.add_scenario(Scenario(), match="disconnect")  # the runner is back
    result = _generate(flux_conn, "a disconnect fox").execute(_context(store, 2))
    assert _paid(emulator) == Counter({"a disconnect fox": 2})
    assert emulator.jobs[result["request_id"]].input["prompt"] == "a disconnect fox"


def test_a_completed_request_survives_fal_dropping_its_result(emulator, flux_conn):
    store = _Store()
    first = _generate(flux_conn, "a kept fox").execute(_context(store, 1))
    emulator.reset()  # fal forgot the request: its status and result now answer 404
    again = _generate(flux_conn, "a kept fox").execute(_context(store, 2))
    assert emulator.requests == [], "the kept result needed no call"
    assert again["request_id"] == first["request_id"]
    assert again["images"] == first["images"] and again["seed"] == first["seed"]
    assert again["cost_usd"] == first["cost_usd"]


def test_a_refused_status_check_fails_the_retry_without_paying(emulator, flux_conn):
    store = _Store()
    # Try 1 paid and died before its wait ended (no outcome kept): the record alone.
    emulator.add_scenario(Scenario(never_complete=True), match="stuck")
    op = _generate(flux_conn, "a stuck fox")
    op.submit(_context(store, 1))
    # The account's key was rotated: the status check answers 403, as a new submit would.
    emulator.token = "another-key"
    with pytest.raises(FluxRequestFailedError, match=r"refused for good .*HTTP 403"):
        _generate(flux_conn, "a stuck fox").execute(_context(store, 2))
    assert len(emulator.jobs) == 1
    assert store.get("flux_request")["handle"]["request_id"] in emulator.jobs


# -- the same paths on Airflow's own retries and task state (dag.test) --------------------------


@pytest.mark.parametrize("window", [False, True], ids=["at_once", "window"])
def test_a_refused_batch_retried_by_airflow_pays_no_prompt_twice(dags, flux_default, capfd, window):
    flux_default.add_scenario(Scenario(submit_errors=[400, 400]), match="refused")
    prompts = [f"batch fox {i}" for i in range(40)]
    prompts[20] = "a refused fox"
    dag_id = "flux_test_batch_refused_window" if window else "flux_test_batch_refused"
    dr = dags.get_dag(dag_id).test(run_conf={"requests": prompts})
    out = capfd.readouterr().out
    assert dr.state == "failed", task_states(dr)
    paid = _paid(flux_default)
    assert set(paid.values()) == {1} and "a refused fox" not in paid, paid
    assert out.count("requests[20]: the submit failed") >= 2  # both tries, with the API's reason
    if window:
        # Try 1 submitted 8 at a time up to the refusal and saw every one of them to its end; try 2
        # kept them all (from the checkpoints, or awaited from the slots) and stopped there again.
        first_try = re.search(r"a retry does not pay for it again\); (\d+) completed", out)
        kept = re.search(r"(\d+) request\(s\) kept from earlier tries \(finished\), (\d+) paid for and awaited", out)
        assert first_try and kept, out[-3000:]
        assert int(kept[1]) + int(kept[2]) == int(first_try[1]) >= 20
        return
    # Try 2 kept every request try 1 paid for, and submitted only the others.
    match = re.search(r"(\d+) request\(s\) kept from earlier tries \(0 completed or final, (\d+) awaited again\)", out)
    assert match and match[1] == match[2], out[-3000:]
    # Try 1 paid for every item before the refused one (all started before it). How many after
    # it each try started depends on when the refusal's answer was seen: that bound is checked
    # exactly, with held answers, by test_a_refused_submit_stops_the_batch_and_no_prompt_is_paid_twice.
    assert int(match[1]) >= 20


def test_an_input_replaced_between_airflow_tries_is_paid_for_again(dags, flux_default, s3):
    s3.put_object(Bucket=s3.bucket, Key="in/v.png", Body=_png((200, 30, 30)), ContentType="image/png")
    s3.put_object(Bucket=s3.bucket, Key="in/new.png", Body=_png((30, 30, 200)), ContentType="image/png")
    dr = dags.get_dag("flux_test_edit_replaced_input").test(
        run_conf={"bucket": s3.bucket, "key": "in/v.png", "other": "in/new.png"}
    )
    assert dr.state == "success", task_states(dr)
    assert len(flux_default.jobs) == 2, "the retry reused a request made from the old bytes"
    handle = xcom(dr, "submit")
    now = s3.head_object(Bucket=s3.bucket, Key="in/v.png")["ETag"]
    assert handle["inputs"] == [pin_s3_uri(s3.bucket, "in/v.png", etag=now)]
    (fetch,) = flux_default.jobs[handle["request_id"]].input_fetches
    assert fetch.sha256 == hashlib.sha256(_png((30, 30, 200))).hexdigest()
    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key="replaced/manifest.json")["Body"].read())
    assert [i["inputs"] for i in manifest["images"]] == [handle["inputs"]]


def test_a_window_of_edits_from_s3_sends_every_request_once_with_its_pinned_input(emulator, flux_conn, s3):
    # More requests than the window: the pinned payloads are read back as each is submitted.
    s3.put_object(Bucket=s3.bucket, Key="in/ok.png", Body=_png((30, 200, 30)), ContentType="image/png")
    requests = [{"prompt": f"window edit {i}", "image_url": f"s3://{s3.bucket}/in/ok.png"} for i in range(6)]
    op = FluxBatchGenerateOperator(
        task_id="b", requests=requests, endpoint=KONTEXT_EDIT, flux_conn_id=flux_conn, max_in_flight=2
    )
    results = op.execute(_context(_Store()))
    assert [r["status"] for r in results] == ["completed"] * 6
    assert len(emulator.calls(kind="submit")) == 6
    for result in results:
        job = emulator.jobs[result["request_id"]]
        assert job.input["prompt"] == result["prompt"]
        assert not job.input["image_url"].startswith("s3://")  # fal got a URL it can fetch
        assert str(result["inputs"]).count(f"s3://{s3.bucket}/in/ok.png") == 1
