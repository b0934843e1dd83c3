"""Copying an image costs the same memory whatever its size (streamed, never held whole)."""

from __future__ import annotations

import base64
import hashlib
import sys
import time
import tracemalloc

import pytest
import requests

from airflow_flux.exceptions import FluxError
from airflow_flux.hooks import FluxHook
from airflow_flux.transfers import FluxToS3Operator
from tests.helpers import FAST_RETRY, free_port, start_server

MB = 1024 * 1024


@pytest.fixture
def emulator_process(make_flux_conn):
    """The emulator in its own process, so the image bytes it serves are not in our heap."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    emulator = [sys.executable, "-m", "airflow_flux.emulator", "--port", str(port)]
    proc = start_server([*emulator, "--queue-seconds", "0", "--run-seconds", "0"], f"{base}/_emulator/health")
    yield base, make_flux_conn(base)
    proc.terminate()
    proc.wait(timeout=10)


def _result(base: str, conn_id: str, size: int, **faults) -> dict:
    tag = f"big{size}{'broken' if faults else ''}"
    scenario = {"image_bytes": size, "queue_seconds": 0, "run_seconds": 0, **faults}
    requests.post(
        f"{base}/_emulator/scenarios", json={"match": tag, "scenario": scenario}, timeout=5
    ).raise_for_status()
    hook = FluxHook(flux_conn_id=conn_id, retry_policy=FAST_RETRY)
    handle = hook.submit({"prompt": f"a {tag} fox", "output_format": "png"})
    for _ in range(100):
        if hook.get_status(handle).is_completed:
            break
        time.sleep(0.05)
    result = hook.get_result(handle).model_dump(mode="json")
    # Make the emulator render and cache the image now, so we time and trace the copy only.
    requests.head(result["images"][0]["url"], timeout=60)
    return result


def _peak_of_copy(op: FluxToS3Operator, result: dict) -> tuple[int, list[str]]:
    op.source = result
    tracemalloc.start()
    try:
        uris = op.execute({})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, uris


# The 64 MB image streamed as one PUT (the default) or, above max_single_put, in parts.
PATHS = pytest.mark.parametrize("options", [{}, {"max_single_put": 0}], ids=["streamed", "multipart"])


@PATHS
def test_peak_memory_does_not_grow_with_the_image(emulator_process, s3, options):
    base, conn_id = emulator_process
    small, big = _result(base, conn_id, 8 * MB), _result(base, conn_id, 64 * MB)
    op = FluxToS3Operator(
        task_id="copy",
        source=None,
        s3_bucket=s3.bucket,
        s3_key_prefix="memory",
        manifest_name=None,
        flux_conn_id=conn_id,
        **options,
    )
    # Warm-up on the same operator: botocore's service model and the connection pools are
    # loaded once (about 12 MiB, whatever the image) and are not what is measured.
    _peak_of_copy(op, _result(base, conn_id, 100_000))

    peak_small, (_uri_small,) = _peak_of_copy(op, small)
    peak_big, (uri_big,) = _peak_of_copy(op, big)

    size_big = s3.head_object(Bucket=s3.bucket, Key=uri_big.split("/", 3)[3])["ContentLength"]
    assert size_big >= 64 * MB
    print(f"peak traced memory: 8 MB image {peak_small / MB:.1f} MiB, 64 MB image {peak_big / MB:.1f} MiB")
    # Flat: the 64 MB copy holds at most two more parts than the 8 MB one (which fits in a
    # single part), far from the ~160 MB an in-memory copy (HttpToS3Operator) would hold.
    assert peak_big <= peak_small + 2 * op.part_size, (peak_small, peak_big)
    assert peak_big < size_big / 3, (peak_big, size_big)
    if not options:  # streamed: a few pieces in flight, not even one part's buffer
        assert peak_big < op.part_size, peak_big

    # The object has an S3 checksum (streamed: the whole object's SHA-256; multipart: a
    # SHA-256 per part), and holds exactly the CDN's bytes.
    key = uri_big.split("/", 3)[3]
    head = s3.head_object(Bucket=s3.bucket, Key=key, ChecksumMode="ENABLED")
    assert head.get("ChecksumSHA256"), "no S3 checksum on the object"
    stored = hashlib.sha256(s3.get_object(Bucket=s3.bucket, Key=key)["Body"].read()).hexdigest()
    served = hashlib.sha256(requests.get(big["images"][0]["url"], timeout=60).content).hexdigest()
    assert stored == served
    if not options:
        assert base64.b64decode(head["ChecksumSHA256"]).hex() == served


@PATHS
def test_a_copy_broken_midway_leaves_nothing(emulator_process, s3, options):
    base, conn_id = emulator_process
    # 12 MB (in 5 MiB parts), the download cut after 7 MB: streamed, 7 MB are already sent;
    # multipart, one part is already up when it breaks.
    result = _result(base, conn_id, 12 * MB, cdn_break_after=7 * MB)
    op = FluxToS3Operator(
        task_id="copy",
        source=result,
        s3_bucket=s3.bucket,
        manifest_name=None,
        flux_conn_id=conn_id,
        part_size=5 * MB,
        s3_key_prefix="broken",
        **options,
    )
    with pytest.raises(FluxError, match="Image download"):
        op.execute({})
    assert s3.list_objects_v2(Bucket=s3.bucket).get("KeyCount") == 0
    assert not s3.list_multipart_uploads(Bucket=s3.bucket).get("Uploads"), "parts left behind"
