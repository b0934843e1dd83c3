"""The streamed single PUT: aws-chunked framing, trailing SHA-256, failures and retries."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import time
import types

import pytest
import requests

from airflow_flux.emulator import Scenario
from airflow_flux.hooks import FluxHook
from airflow_flux.transfers import FluxToS3Operator
from airflow_flux.transfers.s3stream import AWS_CHUNK_SIZE, _AwsChunkedBody, put_stream, stream_to_s3
from tests.helpers import FAST_RETRY

MB = 1024 * 1024


def _decode(encoded: bytes) -> tuple[bytes, dict[str, str]]:
    """An independent aws-chunked decoder: the payload and the trailers."""
    payload, pos = bytearray(), 0
    while True:
        end = encoded.index(b"\r\n", pos)
        size = int(encoded[pos:end], 16)
        pos = end + 2
        if size == 0:
            break
        payload += encoded[pos : pos + size]
        assert encoded[pos + size : pos + size + 2] == b"\r\n"
        pos += size + 2
    trailers = {}
    while not encoded.startswith(b"\r\n", pos):
        end = encoded.index(b"\r\n", pos)
        name, _, value = encoded[pos:end].decode().partition(":")
        trailers[name] = value
        pos = end + 2
    assert pos + 2 == len(encoded), "bytes after the final CRLF"
    return bytes(payload), trailers


@pytest.mark.parametrize("size", [0, 1, 1000, 4096, 4097, 3 * 4096 + 5])
@pytest.mark.parametrize("own_hash", [True, False])
def test_encoding_round_trips_with_the_exact_announced_length(size, own_hash):
    data = os.urandom(size)
    source = io.BytesIO(data)
    digest = hashlib.sha256(data)
    body = _AwsChunkedBody(source.read, size, chunk_size=4096, sha256=None if own_hash else digest.hexdigest)
    pieces = []
    while piece := body.read(1500):
        assert len(piece) <= 1500
        pieces.append(piece)
    encoded = b"".join(pieces)
    assert len(encoded) == len(body) == body.tell()
    payload, trailers = _decode(encoded)
    assert payload == data
    assert trailers == {"x-amz-checksum-sha256": base64.b64encode(digest.digest()).decode()}


def test_chunks_stay_within_what_minio_accepts():
    assert AWS_CHUNK_SIZE <= 16 * MB  # MinIO refuses larger aws-chunked chunks (errChunkTooBig)


def test_body_rewinds_only_before_its_first_read():
    body = _AwsChunkedBody(io.BytesIO(b"abc").read, 3, chunk_size=4096, sha256=None)
    assert body.seek(0) == 0
    body.read(2)
    with pytest.raises(io.UnsupportedOperation):
        body.seek(0)


def test_streamed_put_sends_a_trailer_and_stores_the_full_object_sha256(s3):
    data = os.urandom(20 * MB + 7)
    sent: list[dict[str, str]] = []
    s3.meta.events.register("before-send.s3.PutObject", lambda request, **kw: sent.append(dict(request.headers)))
    mode = stream_to_s3(
        s3,
        io.BytesIO(data).read,
        bucket=s3.bucket,
        key="streamed.png",
        size_hint=len(data),
        extra_args={"ContentType": "image/png", "Metadata": {"flux-index": "0"}},
        part_size=5 * MB,
        concurrency=1,
        digest_metadata_key="flux-sha256",
    )
    assert mode == "streamed"
    (headers,) = sent
    headers = {k.lower(): v.decode() if isinstance(v, bytes) else v for k, v in headers.items()}
    # Streamed, not read first: no checksum header, an unsigned payload with a trailer.
    assert headers["x-amz-content-sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert headers["x-amz-trailer"] == "x-amz-checksum-sha256"
    assert headers["content-encoding"] == "aws-chunked"
    assert headers["x-amz-decoded-content-length"] == str(len(data))
    assert "x-amz-checksum-sha256" not in headers
    assert int(headers["content-length"]) > len(data)

    head = s3.head_object(Bucket=s3.bucket, Key="streamed.png", ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]) == hashlib.sha256(data).digest(), "not the whole object's"
    assert (head["ContentLength"], head["ContentType"], head["Metadata"]) == (
        len(data),
        "image/png",
        {"flux-index": "0"},
    )
    assert s3.get_object(Bucket=s3.bucket, Key="streamed.png")["Body"].read() == data
    assert not s3.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def test_unknown_size_and_above_the_single_put_limit_go_multipart(s3):
    data = os.urandom(11 * MB)
    for key, size_hint, limit in (("unknown", None, 5 * 1024**3), ("large", len(data), 10 * MB)):
        mode = stream_to_s3(
            s3,
            io.BytesIO(data).read,
            bucket=s3.bucket,
            key=key,
            size_hint=size_hint,
            extra_args={"ContentType": "image/png"},
            part_size=5 * MB,
            concurrency=1,
            max_single_put=limit,
        )
        assert mode == "multipart"
        assert s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read() == data


class _Broken(io.BytesIO):
    """A source that fails after ``limit`` bytes, as a dropped download does."""

    def __init__(self, data: bytes, limit: int) -> None:
        super().__init__(data)
        self.limit = limit

    def read(self, n: int | None = -1) -> bytes:
        if self.tell() >= self.limit:
            raise ConnectionResetError("download dropped")
        return super().read(min(n if n is not None and n >= 0 else self.limit, self.limit - self.tell()))


@pytest.mark.parametrize(
    ("source", "size", "error"),
    [
        (_Broken(b"x" * (12 * MB), 7 * MB), 12 * MB, ConnectionResetError),  # the source's own error
        (io.BytesIO(b"x" * (9 * MB)), 12 * MB, ValueError),  # shorter than announced
        (io.BytesIO(b"x" * (12 * MB)), 9 * MB, ValueError),  # longer than announced
    ],
    ids=["broken", "short", "long"],
)
def test_a_failed_source_leaves_no_object(s3, source, size, error):
    with pytest.raises(error):
        put_stream(s3, source.read, bucket=s3.bucket, key="broken", size=size, extra_args={})
    assert s3.list_objects_v2(Bucket=s3.bucket).get("KeyCount") == 0


def _result(emulator, conn_id: str, prompt: str, size: int) -> dict:
    emulator.add_scenario(Scenario(image_bytes=size), match=prompt)
    hook = FluxHook(flux_conn_id=conn_id, retry_policy=FAST_RETRY)
    handle = hook.submit({"prompt": prompt, "output_format": "png"})
    deadline = time.monotonic() + 10
    while not hook.get_status(handle).is_completed:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return hook.get_result(handle).model_dump(mode="json")


def _copier(s3, conn_id: str, result: dict, prefix: str, **options) -> FluxToS3Operator:
    """The operator copying ``result`` under ``prefix``, with the fast test retry policy."""
    op = FluxToS3Operator(
        task_id="copy", source=result, s3_bucket=s3.bucket, s3_key_prefix=prefix, flux_conn_id=conn_id, **options
    )
    op.flux_hook.retry_policy = FAST_RETRY
    return op


@pytest.mark.parametrize(("read_first", "downloads"), [(MB, 2), (0, 1)], ids=["mid-body", "before-body"])
def test_an_s3_failure_is_retried_by_downloading_again_once_the_body_started(
    emulator, make_flux_conn, s3, read_first, downloads
):
    from botocore.exceptions import ConnectionClosedError

    conn_id = make_flux_conn(emulator.base_url)
    result = _result(emulator, conn_id, f"flaky s3 fox {read_first}", 12 * MB)
    op = _copier(s3, conn_id, result, "flaky", manifest_name=None)
    failures = []

    def drop_the_first_put(request, **kwargs):
        if not failures:
            failures.append(request.body.read(read_first) if read_first else b"")
            raise ConnectionClosedError(endpoint_url=request.url)

    op.s3_hook.get_conn().meta.events.register("before-send.s3.PutObject", drop_the_first_put)
    (uri,) = op.execute({})

    # Once the body had started, botocore could not resend it: the operator downloaded
    # the image again. Before that, botocore simply retried the PUT.
    gets = [c for c in emulator.calls(kind="cdn") if c.method == "GET"]
    assert len(gets) == downloads
    served = hashlib.sha256(requests.get(result["images"][0]["url"], timeout=60).content)
    head = s3.head_object(Bucket=s3.bucket, Key=uri.split("/", 3)[3], ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]) == served.digest()
    assert head["ContentLength"] == 12 * MB


def test_an_s3_error_after_the_body_fails_the_copy_and_stores_nothing(emulator, make_flux_conn, s3):
    from botocore.exceptions import ConnectionClosedError

    conn_id = make_flux_conn(emulator.base_url)
    result = _result(emulator, conn_id, "always failing s3 fox", 12 * MB)
    op = _copier(s3, conn_id, result, "down", manifest_name=None)

    def always_fail(request, **kwargs):
        request.body.read(MB)
        raise ConnectionClosedError(endpoint_url=request.url)

    op.s3_hook.get_conn().meta.events.register("before-send.s3.PutObject", always_fail)
    with pytest.raises(Exception, match=r"Upload to S3 broke.*ConnectionClosedError"):
        op.execute({})
    assert s3.list_objects_v2(Bucket=s3.bucket).get("KeyCount") == 0
    assert len([c for c in emulator.calls(kind="cdn") if c.method == "GET"]) == FAST_RETRY.max_attempts


@pytest.mark.parametrize("size", [2 * MB, 12 * MB], ids=["buffered", "streamed"])
def test_a_retried_task_reuses_the_image_an_earlier_try_copied(emulator, make_flux_conn, s3, size):
    conn_id = make_flux_conn(emulator.base_url)
    result = _result(emulator, conn_id, f"copied once fox {size}", size)

    ti = types.SimpleNamespace(dag_id="d", run_id="r", task_id="copy", map_index=-1, xcom_push=lambda **_: None)

    def copy() -> None:
        _copier(s3, conn_id, result, "again").execute({"ti": ti})

    copy()
    first = s3.get_object(Bucket=s3.bucket, Key="again/manifest.json")["Body"].read()
    emulator.clear_requests()
    copy()  # the task's retry, after the copy but (say) before its XCom was written
    (image,) = json.loads(s3.get_object(Bucket=s3.bucket, Key="again/manifest.json")["Body"].read())["images"]
    (before,) = json.loads(first)["images"]
    assert image["status"] == "reused", image
    assert [c for c in emulator.calls(kind="cdn") if c.method == "GET"] == [], "not downloaded again"
    assert (
        image["sha256"]
        == before["sha256"]
        == hashlib.sha256(requests.get(result["images"][0]["url"], timeout=60).content).hexdigest()
    )
