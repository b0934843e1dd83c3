"""Part 3: copying generated images to S3 — memory and wall time, side by side.

Contenders, each round in a fresh process (so its RSS growth is its own), against the same
emulator CDN and the same moto S3 server (both in other processes):

* ``FluxToS3Operator`` (this provider): streamed, bounded memory;
* the amazon provider's ``HttpToS3Operator``, one per image (reads the body into memory);
* boto3 ``upload_file`` of the same bytes from local disk (no download at all: the limit).

The fresh processes are forked from this one once Airflow, boto3 and the operators are
imported (about 7 s a process here, which dominated the run when each contender started
Python anew); each then warms up on a small image and measures the copy from there.
Contenders alternate within a round, so load from other work hits them alike; figures are
medians over the rounds.

Run: ``python bench/transfer.py`` (``--quick``: the 50 MB case only, 1 round).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    TOKEN,
    Emulator,
    airflow_env,
    command_line,
    dump_json,
    fmt,
    goal,
    hwm_kb,
    md_table,
    median,
    moto_server,
    print_header,
    ratio,
    reset_hwm,
)

MB = 1024 * 1024
COMPONENTS_ORDER = ("download_only", "put_from_memory", "chunked_from_memory")
CONTENDERS = ("flux", "http_to_s3", "upload_file", *COMPONENTS_ORDER)
LABELS = {
    "flux": "FluxToS3Operator",
    "http_to_s3": "HttpToS3Operator (one per image)",
    "upload_file": "boto3 upload_file from disk (limit)",
    "download_only": "component: download only (FluxHook.open_image, bytes dropped)",
    "put_from_memory": "component: one put_object of bytes already in memory",
    "chunked_from_memory": "component: the same PUT framed as the operator sends it (aws-chunked, SHA-256 trailer)",
}
#: Not copies: the parts of a streamed copy, measured alone, to show where its time goes.
COMPONENTS = ("download_only", "put_from_memory", "chunked_from_memory")
BUCKET = "bench-transfer"


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def _connections(api: str, s3: str) -> None:
    os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps(
        {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {"endpoint_url": s3, "region_name": "us-east-1"},
        }
    )
    os.environ["AIRFLOW_CONN_FLUX_BENCH"] = json.dumps({"conn_type": "flux", "host": api, "password": TOKEN})
    os.environ["AIRFLOW_CONN_CDN"] = json.dumps({"conn_type": "http", "host": api})


def worker(
    contender: str,
    api: str,
    s3: str,
    case: str,
    results: list[dict[str, Any]],
    warm: list[dict[str, Any]],
    files: list[str],
) -> dict[str, float]:
    """One contender copies one case (``case``: its key prefix), in this (fresh, forked) process."""
    import boto3
    from airflow.providers.amazon.aws.transfers.http_to_s3 import HttpToS3Operator

    from airflow_flux.hooks import FluxHook
    from airflow_flux.transfers import FluxToS3Operator
    from airflow_flux.transfers.s3stream import put_stream

    _connections(api, s3)
    client = boto3.client(
        "s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )

    flux_op: FluxToS3Operator | None = None
    in_memory: list[bytes] = []

    def run_once(tag: str, source: list[dict[str, Any]]) -> None:
        nonlocal flux_op
        if contender == "flux":
            # One operator, as one task has: its S3 client (a fresh boto3 session in S3Hook,
            # about 12 MB of service model) is made in the warm-up, like upload_file's client.
            if flux_op is None:
                flux_op = FluxToS3Operator(
                    task_id="flux",
                    source=source,
                    s3_bucket=BUCKET,
                    s3_key_prefix=f"flux/{tag}",
                    manifest_name=None,
                    flux_conn_id="flux_bench",
                    replace=True,
                )
            flux_op.source, flux_op.s3_key_prefix = source, f"flux/{tag}"
            flux_op.execute({})
        elif contender == "download_only":
            hook = FluxHook(flux_conn_id="flux_bench")
            for img in (img for r in source for img in r["images"]):
                with hook.open_image(img["url"]) as stream:
                    while stream.read(MB):
                        pass
        elif contender in ("put_from_memory", "chunked_from_memory"):
            if tag == "warm":
                client.put_object(Bucket=BUCKET, Key="warm/0", Body=b"x" * 1024)
            for i, data in enumerate(in_memory):
                key = f"mem/{tag}/{i}"
                if contender == "put_from_memory":
                    client.put_object(Bucket=BUCKET, Key=key, Body=data)
                else:
                    put_stream(client, io.BytesIO(data).read, bucket=BUCKET, key=key, size=len(data), extra_args={})
        elif contender == "http_to_s3":
            for i, img in enumerate(img for r in source for img in r["images"]):
                HttpToS3Operator(
                    task_id=f"http_{tag}_{i}",
                    http_conn_id="cdn",
                    endpoint=img["url"][len(api) :],
                    s3_bucket=BUCKET,
                    s3_key=f"http/{tag}/{i}",
                    replace=True,
                ).execute({})
        elif tag == "warm":
            client.put_object(Bucket=BUCKET, Key="warm/0", Body=b"x" * 1024)
        else:
            for i, path in enumerate(files):
                client.upload_file(path, BUCKET, f"file/{tag}/{i}")

    # Warm-up on a small image: clients, pools and botocore models are loaded before the
    # baseline, so growth is what the copy itself costs.
    run_once("warm", warm)
    if contender in ("put_from_memory", "chunked_from_memory"):  # read before the baseline: only the PUT counts
        in_memory.extend(Path(path).read_bytes() for path in files)
    # The kernel's peak-RSS counter is reset here, so the peak is the copy's own: with
    # ru_maxrss, a warm-up peak above the copy's would hide the copy's growth entirely.
    if not reset_hwm():
        raise RuntimeError("cannot reset the peak-RSS counter (/proc/self/clear_refs)")
    base_now = _rss_now_mb()
    started = time.perf_counter()
    run_once(case, results)
    wall = time.perf_counter() - started
    growth = max(0.0, hwm_kb() / 1024 - base_now)
    total = 0
    if contender != "download_only":
        prefix = {"flux": "flux", "http_to_s3": "http", "upload_file": "file"}.get(contender, "mem")
        listing = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/{case}/").get("Contents", [])
        total = sum(client.head_object(Bucket=BUCKET, Key=k["Key"])["ContentLength"] for k in listing)
    return {"wall": wall, "rss_growth_mb": growth, "bytes": total}


def in_fresh_process(fn: Any, *args: Any) -> dict[str, float]:
    """``fn(*args)`` in a child forked from this process; its result comes back as JSON."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_WRONLY)  # the operators' task logs
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        code = 0
        try:
            out = json.dumps(fn(*args)).encode()
        except BaseException:
            out, code = json.dumps({"error": traceback.format_exc()}).encode(), 1
        with os.fdopen(write_end, "wb") as fh:
            fh.write(out)
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        data = json.loads(fh.read() or b"{}")
    os.waitpid(pid, 0)
    if "error" in data or not data:
        raise RuntimeError(f"worker failed: {data.get('error', 'no output')}")
    return data


def _submit_big(emu: Emulator, size: int, count: int) -> list[dict[str, Any]]:
    """Requests whose images are ``size`` bytes (``count`` images in all), completed and cached."""
    tag = f"big{size}x{count}"
    emu.scenario(tag, image_bytes=size, queue_seconds=0, run_seconds=0)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    body = json.dumps({"prompt": f"a {tag} fox", "output_format": "png", "num_images": count}).encode()
    req = urllib.request.Request(
        f"{emu.base_url}/fal-ai/flux-pro/kontext/text-to-image", data=body, headers=headers, method="POST"
    )
    handle = json.loads(urllib.request.urlopen(req, timeout=30).read())
    time.sleep(0.3)
    result = json.loads(
        urllib.request.urlopen(urllib.request.Request(handle["response_url"], headers=headers), timeout=30).read()
    )
    result["request_id"] = handle["request_id"]
    for img in result["images"]:  # render and cache now, outside any timing
        urllib.request.urlopen(urllib.request.Request(img["url"], method="HEAD"), timeout=300).close()
    return [result]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write raw figures here")
    args = parser.parse_args()

    print_header("Part 3: copying images to S3 (peak RSS growth and wall time)")
    cases = [("1 x 50 MB", 50 * MB, 1), ("1 x 100 MB", 100 * MB, 1), ("4 x 32 MB", 32 * MB, 4)]
    if args.quick:
        cases, args.rounds = cases[:1], 1
    airflow_env()
    # Imported once here, inherited by every forked worker.
    import boto3
    from airflow.providers.amazon.aws.transfers.http_to_s3 import HttpToS3Operator  # noqa: F401

    from airflow_flux.transfers import FluxToS3Operator  # noqa: F401

    rows, raw = [], []
    with moto_server() as s3_url:
        boto3.client(
            "s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
        ).create_bucket(Bucket=BUCKET)
        with Emulator(queue_seconds=0, run_seconds=0, real_images=True) as emu, tempfile.TemporaryDirectory() as tmp:
            warm = _submit_big(emu, 200_000, 1)
            for label, size, count in cases:
                results = _submit_big(emu, size, count)
                # The limit's bytes on local disk, once per case (not timed).
                files = []
                for i, img in enumerate(img for r in results for img in r["images"]):
                    path = Path(tmp) / f"{size}x{count}_{i}"
                    with urllib.request.urlopen(img["url"]) as resp, path.open("wb") as out:
                        while chunk := resp.read(MB):
                            out.write(chunk)
                    files.append(str(path))
                runs: dict[str, list[dict[str, float]]] = {c: [] for c in CONTENDERS}
                for _ in range(args.rounds):
                    for contender in CONTENDERS:
                        runs[contender].append(
                            in_fresh_process(
                                worker, contender, emu.base_url, s3_url, f"{size}x{count}", results, warm, files
                            )
                        )
                figures = {
                    c: {k: median([r[k] for r in runs[c]]) for k in ("wall", "rss_growth_mb")} for c in CONTENDERS
                }
                limit = figures["upload_file"]
                for contender in CONTENDERS:
                    f = figures[contender]
                    rows.append(
                        [
                            label,
                            LABELS[contender],
                            fmt(f["rss_growth_mb"], 1),
                            ratio(f["rss_growth_mb"], limit["rss_growth_mb"]),
                            fmt(f["wall"]),
                            ratio(f["wall"], limit["wall"]),
                        ]
                    )
                    raw.append(
                        {
                            "case": label,
                            "contender": contender,
                            "label": LABELS[contender],
                            "rounds": args.rounds,
                            "rss_growth_mb": f["rss_growth_mb"],
                            "wall": f["wall"],
                            "rss_growth_vs_upload_file": _quotient(f["rss_growth_mb"], limit["rss_growth_mb"]),
                            "wall_vs_upload_file": _quotient(f["wall"], limit["wall"]),
                            "rss_growth_mb_rounds": [r["rss_growth_mb"] for r in runs[contender]],
                            "wall_rounds": [r["wall"] for r in runs[contender]],
                            "bytes": runs[contender][-1]["bytes"],
                        }
                    )
    print(
        md_table(
            ["case", "contender", "peak RSS growth MB (median)", "vs upload_file", "wall s (median)", "vs upload_file"],
            rows,
        )
    )
    print(
        f"\n{args.rounds} round(s) each, each round a fresh process. Every contender's S3 client exists before"
        " its baseline (made by its warm-up copy), as it would in a task copying several images, except"
        " HttpToS3Operator's: one operator per image makes a new S3Hook, and so a new boto3 session and about 12 MB"
        " of service model, per image. Peak RSS growth is the kernel's peak-RSS counter (reset right before the copy)"
        " minus the RSS at that moment: 0.0 means the copy stayed within memory the process already held after its"
        " warm-up copy. The two components are not copies: a streamed copy cannot beat the slower of"
        " them, and upload_file (no download, parts uploaded by 10 threads) beats both.\n"
    )
    for line in _goals(raw):
        print(line)
    print(f"\nCommand: `{command_line()}`")
    dump_json(args.json, {"rounds": args.rounds, "figures": raw})


def _goals(raw: list[dict[str, Any]]) -> list[str]:
    """Check issue #6's goals for FluxToS3Operator (recorded for the summary); returns lines to print."""
    flux = {r["case"]: r for r in raw if r["contender"] == "flux"}
    lines = []
    for case in ("1 x 50 MB", "1 x 100 MB"):
        if case in flux:
            f = flux[case]
            mem = f["rss_growth_vs_upload_file"]
            verdict = goal(
                f"{case}: peak RSS growth <= upload_file's",
                f"{f['rss_growth_mb']:.1f} MB ({mem:.2f}x)",
                mem is not None and mem <= 1.0,
            )
            lines.append(f"- {case}: memory {verdict} ({f['rss_growth_mb']:.1f} MB, {mem:.2f}x upload_file's)")
    if "1 x 50 MB" in flux and "1 x 100 MB" in flux:
        small, big = flux["1 x 50 MB"]["rss_growth_mb"], flux["1 x 100 MB"]["rss_growth_mb"]
        # Flat: within 10 % or 1 MB (RSS is counted in pages and allocator arenas: near zero,
        # a ratio means nothing).
        verdict = goal(
            "Peak RSS growth flat when the image doubles (within 10 % or 1 MB)",
            f"{small:.1f} -> {big:.1f} MB",
            big <= max(1.1 * small, small + 1.0),
        )
        lines.append(f"- 50 -> 100 MB: memory flat {verdict} ({small:.1f} -> {big:.1f} MB)")
    parts = {(r["case"], r["contender"]): r for r in raw if r["contender"] in COMPONENTS}
    for case in ("1 x 50 MB", "1 x 100 MB", "4 x 32 MB"):
        if case in flux:
            f = flux[case]
            wall = f["wall_vs_upload_file"]
            floor = ""
            download, put = parts.get((case, "download_only")), parts.get((case, "chunked_from_memory"))
            if download and put and wall:
                slower = max(download["wall"], put["wall"])
                floor = (
                    f"a streamed copy's floor on this S3 server is the slower half: download {download['wall']:.2f} s, "
                    f"the same aws-chunked PUT from memory {put['wall']:.2f} s "
                    f"({_quotient(slower, f['wall'] / wall) or 0:.2f}x upload_file's)"
                )
            ok = wall is not None and wall <= 1.25
            verdict = goal(
                f"{case}: wall <= 1.25x upload_file's", f"{f['wall']:.2f} s ({wall:.2f}x)", ok, "" if ok else floor
            )
            lines.append(
                f"- {case}: wall {verdict} ({f['wall']:.2f} s, {wall:.2f}x upload_file's)"
                + (f"; {floor}" if floor else "")
            )
    if "4 x 32 MB" in flux:
        f = flux["4 x 32 MB"]
        goal(
            "4 x 32 MB: memory as low as reasonable",
            f"{f['rss_growth_mb']:.1f} MB ({f['rss_growth_vs_upload_file']:.2f}x upload_file's)",
            None,
        )
        lines.append(
            f"- 4 x 32 MB: memory {f['rss_growth_mb']:.1f} MB, {f['rss_growth_vs_upload_file']:.2f}x upload_file's"
        )
    return lines


def _quotient(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


if __name__ == "__main__":
    main()
