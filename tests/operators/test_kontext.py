"""The Kontext family: edits of images in S3, several inputs, fal's request options, cost.

Real sockets: the emulator fetches each input the way fal would (a presigned GET to the
moto S3 server, no Authorization header) and derives its output from the input image.
"""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from PIL import Image

from airflow_flux.emulator import Scenario
from airflow_flux.exceptions import FluxRequestFailedError, FluxValidationError
from airflow_flux.models import KONTEXT_EDIT, KONTEXT_MAX_EDIT, KONTEXT_MULTI, KONTEXT_TEXT_TO_IMAGE
from airflow_flux.operators import FluxGenerateOperator, FluxSubmitOperator
from airflow_flux.sensors import FluxStatusSensor
from tests.helpers import TOKEN, task_states, xcom

pytestmark = pytest.mark.usefixtures("airflow_db")

#: What marks a signed query, SigV4 or SigV2 (botocore presigns with either, per connection config).
SIGNATURE = "Signature="


def _signature(url: str) -> str:
    query = parse_qs(urlsplit(url).query)
    return (query.get("X-Amz-Signature") or query["Signature"])[0]


def _png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def _centre(data: bytes) -> tuple[int, int, int]:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return image.getpixel((image.width // 2, image.height // 2))


@pytest.fixture
def red_input(s3) -> str:
    s3.put_object(Bucket=s3.bucket, Key="inputs/red.png", Body=_png((220, 20, 20)), ContentType="image/png")
    return f"s3://{s3.bucket}/inputs/red.png"


@pytest.fixture
def s3_recording(moto_server):
    """What reached the S3 server during the test (moto's request recorder)."""
    requests.post(f"{moto_server}/moto-api/recorder/reset-recording", timeout=10)
    requests.post(f"{moto_server}/moto-api/recorder/start-recording", timeout=10)

    def read() -> list[dict[str, Any]]:
        requests.post(f"{moto_server}/moto-api/recorder/stop-recording", timeout=10)
        text = requests.get(f"{moto_server}/moto-api/recorder/download-recording", timeout=10).text
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    yield read
    requests.post(f"{moto_server}/moto-api/recorder/stop-recording", timeout=10)


def _db_rows_with(text: str) -> list[str]:
    """Every table.column of the unit tests' metadata DB holding ``text``."""
    import os

    path = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
    found = []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            cursor = conn.execute(f'SELECT * FROM "{table}"')
            columns = [d[0] for d in cursor.description]
            for row in cursor:
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes):
                        value = value.decode("utf-8", "replace")
                    if isinstance(value, str) and text in value:
                        found.append(f"{table}.{column}")
    return found


def test_edit_of_an_s3_image_end_to_end(dags, flux_default, s3, red_input, s3_recording, capfd):
    dr = dags.get_dag("flux_test_edit_from_s3").test(run_conf={"bucket": s3.bucket, "key": "inputs/red.png"})
    logs = capfd.readouterr()
    recorded = s3_recording()
    assert dr.state == "success", task_states(dr)

    # fal got a presigned GET URL for the private object, and fetched it without our token.
    (job,) = flux_default.jobs.values()
    sent = job.input["image_url"]
    assert sent.startswith(f"{s3.meta.endpoint_url}/{s3.bucket}/inputs/red.png?") and SIGNATURE in sent
    (fetch,) = job.input_fetches
    assert fetch.status == 200 and not fetch.authorization_sent
    fetched = [r for r in recorded if r["method"] == "GET" and SIGNATURE in r["url"]]
    assert fetched and all("Authorization" not in r["headers"] for r in fetched)
    assert not [r for r in recorded if TOKEN in json.dumps(r)], "the API token reached the S3 server"

    # The result and the manifest say what the edit was made from (the caller's URI) and cost.
    # The input is recorded pinned to the object that was edited (its ETag: no versioning here).
    pinned = f"{red_input}?etag={s3.head_object(Bucket=s3.bucket, Key='inputs/red.png')['ETag'].strip(chr(34))}"
    handle, result = xcom(dr, "submit"), xcom(dr, "wait")
    assert handle["inputs"] == [pinned] and handle["endpoint"] == KONTEXT_EDIT
    assert result["inputs"] == [pinned] and result["cost_usd"] == 0.04
    manifest = json.loads(s3.get_object(Bucket=s3.bucket, Key="edits/manifest.json")["Body"].read())
    (entry,) = manifest["images"]
    assert entry["inputs"] == [pinned] and entry["endpoint"] == KONTEXT_EDIT
    assert entry["cost_usd"] == 0.04 and manifest["cost_usd"] == 0.04
    # The output is derived from the input: the emulator's edit keeps the input's colour.
    out = s3.get_object(Bucket=s3.bucket, Key=entry["key"])["Body"].read()
    r, g, b = _centre(out)
    assert r > 150 and g < 100 and b < 100, (r, g, b)

    # The presigned URL is a credential: in no log, XCom, trigger row, task state or manifest.
    signature = _signature(sent)
    assert signature not in logs.out + logs.err
    assert SIGNATURE not in json.dumps([handle, result, manifest]) and signature not in json.dumps(manifest)
    assert _db_rows_with(signature) == []
    assert "cost $0.0400" in logs.out


def test_multi_with_two_inputs_and_a_retry_that_reuses_its_request(dags, flux_default, s3, red_input, capfd):
    blue = "data:image/png;base64," + base64.b64encode(_png((20, 20, 220))).decode()
    dr = dags.get_dag("flux_test_edit_multi_retry").test(
        run_conf={"bucket": s3.bucket, "key": "inputs/red.png", "other": blue}
    )
    logs = capfd.readouterr().out
    assert dr.state == "success", task_states(dr)
    # Try 1 submitted and died; try 2 presigned anew (another URL) and still reused its request.
    (job,) = flux_default.jobs.values()
    assert len(flux_default.calls(kind="submit")) == 1
    assert "of try 1 already completed; its result was kept" in logs
    assert SIGNATURE in job.input["image_urls"][0] and job.input["image_urls"][1] == blue
    assert [f.ok for f in job.input_fetches] == [True, True]
    result = xcom(dr, "generate")
    assert result["inputs"][0].startswith(f"{red_input}?etag=")
    assert result["inputs"][1].startswith("data:image/png;") and "base64" not in result["inputs"][1]
    assert result["cost_usd"] == 0.16  # [max]: $0.08 x 2 images


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoint": KONTEXT_EDIT}, r"image_url: is required"),
        ({"endpoint": KONTEXT_MULTI, "image_urls": []}, r"image_urls: must be a non-empty list of image URLs"),
        ({"endpoint": KONTEXT_EDIT, "image_url": "ftp://host/a.png"}, r"image_url: must be an s3://bucket/key URI"),
        ({"endpoint": KONTEXT_EDIT, "image_url": "s3://only-a-bucket"}, r"image_url: an s3:// URI needs a bucket"),
        ({"image_url": "s3://b/k.png"}, r"image_url: unknown field for endpoint " + KONTEXT_TEXT_TO_IMAGE),
        ({"priority": "urgent"}, r"priority: must be one of 'normal', 'low' \(got 'urgent'\)"),
        ({"start_timeout": 0.5}, r"start_timeout: must be a number of seconds greater than 1 \(got 0.5\)"),
        ({"input_delivery": "inline"}, r"input_delivery: must be one of 'presigned_url', 'data_uri'"),
    ],
)
def test_bad_edit_input_is_refused_when_the_dag_is_parsed(emulator, kwargs, message):
    with pytest.raises(FluxValidationError, match=message):
        FluxSubmitOperator(task_id="bad", prompt="a fox", **kwargs)
    with pytest.raises(FluxValidationError, match=message):
        FluxGenerateOperator(task_id="bad", prompt="a fox", **kwargs)
    assert emulator.requests == []
    # Templated inputs are checked after rendering instead.
    FluxSubmitOperator(task_id="ok", prompt="a fox", endpoint=KONTEXT_EDIT, image_url="{{ params.image }}")


class _TI(SimpleNamespace):
    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed = {**getattr(self, "pushed", {}), key: value}


def _context() -> dict[str, Any]:
    return {"task_state_store": None, "ti": _TI(try_number=1, max_tries=0, task=None)}


def test_a_missing_s3_input_fails_before_any_call(emulator, flux_conn, s3):
    op = FluxSubmitOperator(
        task_id="submit",
        prompt="a fox",
        endpoint=KONTEXT_EDIT,
        image_url=f"s3://{s3.bucket}/nope.png",
        flux_conn_id=flux_conn,
    )
    with pytest.raises(FluxValidationError, match=rf"image_url: s3://{s3.bucket}/nope.png does not exist"):
        op.submit(_context())
    assert emulator.calls(kind="submit") == []


def test_an_input_fal_cannot_fetch_fails_with_the_apis_reason_naming_the_field(
    emulator, flux_conn, s3, red_input, capfd
):
    # The object is deleted after the submit: fal's fetch of the presigned URL gets a 404 and
    # fal answers 422 naming image_url, echoing the URL back; the task's error must not.
    op = FluxSubmitOperator(
        task_id="submit", prompt="a fox", endpoint=KONTEXT_EDIT, image_url=red_input, flux_conn_id=flux_conn
    )
    emulator.add_scenario(Scenario(queue_seconds=0.5))
    handle = op.submit(_context())
    s3.delete_object(Bucket=s3.bucket, Key="inputs/red.png")
    sensor = FluxStatusSensor(task_id="wait", request=handle, deferrable=False, poll_interval=0.1, timeout=30)
    with pytest.raises(FluxRequestFailedError) as info:
        sensor._wait_blocking(sensor.handle)  # the handle's own connection, as execute() does
    message = str(info.value)
    assert "image_url" in message and info.value.status_code == 422
    assert SIGNATURE not in message and "signed query redacted" in message
    assert SIGNATURE not in capfd.readouterr().out


def test_request_options_and_connection_policy_are_sent_as_headers(emulator, make_flux_conn, s3, red_input):
    conn = make_flux_conn(emulator.base_url, store_io=False, media_expires_in=86400)
    op = FluxSubmitOperator(
        task_id="submit",
        prompt="a fox",
        endpoint=KONTEXT_EDIT,
        image_url=red_input,
        start_timeout=120,
        priority="low",
        flux_conn_id=conn,
    )
    op.submit(_context())
    (submit,) = emulator.calls(kind="submit")
    headers = {k.lower(): v for k, v in submit.headers.items()}
    assert headers["x-fal-request-timeout"] == "120"
    assert headers["x-fal-queue-priority"] == "low"
    assert headers["x-fal-store-io"] == "0"
    assert json.loads(headers["x-fal-object-lifecycle-preference"]) == {"expiration_duration_seconds": 86400}
    (job,) = emulator.jobs.values()
    assert job.priority == "low"
    # Without options or policy, none of them is sent (fal's own defaults apply).
    emulator.clear_requests()
    FluxSubmitOperator(task_id="plain", prompt="a fox", flux_conn_id=make_flux_conn(emulator.base_url)).submit(
        _context()
    )
    (plain,) = emulator.calls(kind="submit")
    assert not {k.lower() for k in plain.headers} & {"x-fal-request-timeout", "x-fal-queue-priority", "x-fal-store-io"}


def test_a_missed_start_deadline_is_final_and_not_billed_twice(emulator, flux_conn):
    emulator.add_scenario(Scenario(queue_seconds=5), match="slow start")
    op = FluxGenerateOperator(
        task_id="g", prompt="a slow start fox", start_timeout=1.5, flux_conn_id=flux_conn, deferrable=False
    )
    handle = op.submit(_context())
    with pytest.raises(FluxRequestFailedError, match="request_timeout") as info:
        op._wait_blocking(handle)
    # fal ends such a request COMPLETED with error_type request_timeout (its result: 504,
    # X-Fal-Request-Timeout-Type: user): final, so nothing is submitted again.
    assert info.value.error_type == "request_timeout"
    (job,) = emulator.jobs.values()
    assert job.request_timeout == 1.5
    assert len(emulator.calls(kind="submit")) == 1


@pytest.mark.parametrize(
    ("endpoint", "extra", "images", "expected"),
    [
        (KONTEXT_TEXT_TO_IMAGE, {}, 1, 0.04),
        (KONTEXT_MAX_EDIT, {}, 2, 0.16),
        (KONTEXT_EDIT, {"price_per_image": 0.05}, 2, 0.10),  # an aggregator's own price
    ],
)
def test_cost_is_the_price_per_image_times_the_images(
    emulator, make_flux_conn, red_input, endpoint, extra, images, expected
):
    conn = make_flux_conn(emulator.base_url, **extra)
    inputs = {} if endpoint == KONTEXT_TEXT_TO_IMAGE else {"image_url": red_input}
    op = FluxGenerateOperator(
        task_id="g", prompt="a fox", endpoint=endpoint, num_images=images, flux_conn_id=conn, deferrable=False, **inputs
    )
    result = op._wait_blocking(op.submit(_context()))
    assert result["cost_usd"] == pytest.approx(expected)
