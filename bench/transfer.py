"""Part 3: copying generated images to S3 — memory and wall time, side by side.

Contenders, each in a fresh process (so its RSS growth is its own), against the same
emulator CDN and the same moto S3 server (both in other processes):

* ``FluxToS3Operator`` (this provider): streamed, bounded part buffers;
* the amazon provider's ``HttpToS3Operator``, one per image (reads the body into memory);
* boto3 ``upload_file`` of the same bytes from local disk (no download at all: the limit).

Run: ``python bench/transfer.py`` (``--quick``: the 50 MB case only, 1 round).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    TOKEN,
    Emulator,
    airflow_env,
    command_line,
    dump_json,
    fmt,
    free_port,
    md_table,
    median,
    print_header,
    ratio,
)

MB = 1024 * 1024
CONTENDERS = ("flux", "http_to_s3", "upload_file")
LABELS = {
    "flux": "FluxToS3Operator",
    "http_to_s3": "HttpToS3Operator (one per image)",
    "upload_file": "boto3 upload_file from disk (limit)",
}


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def worker(args: argparse.Namespace) -> None:
    """One contender, one case, in this process; prints a JSON line."""
    airflow_env()
    os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps(
        {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {"endpoint_url": args.s3, "region_name": "us-east-1"},
        }
    )
    os.environ["AIRFLOW_CONN_FLUX_BENCH"] = json.dumps({"conn_type": "flux", "host": args.api, "password": TOKEN})
    os.environ["AIRFLOW_CONN_CDN"] = json.dumps({"conn_type": "http", "host": args.api})
    results = json.loads(Path(args.results).read_text())
    images = [img for r in results for img in r["images"]]
    import boto3

    from airflow_flux.transfers import FluxToS3Operator

    client = boto3.client(
        "s3", endpoint_url=args.s3, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
    )
    files: list[str] = []
    if args.contender == "upload_file":
        # The bytes on local disk first (not timed): the limit has no download to do.
        for i, img in enumerate(images):
            path = Path(args.tmp) / f"img{i}"
            with urllib.request.urlopen(img["url"]) as resp, path.open("wb") as out:
                while chunk := resp.read(MB):
                    out.write(chunk)
            files.append(str(path))

    def run_once(tag: str) -> None:
        if args.contender == "flux":
            op = FluxToS3Operator(
                task_id=f"flux_{tag}",
                source=results,
                s3_bucket=args.bucket,
                s3_key_prefix=f"flux/{tag}",
                manifest_name=None,
                flux_conn_id="flux_bench",
                replace=True,
            )
            op.execute({})
        elif args.contender == "http_to_s3":
            from airflow.providers.amazon.aws.transfers.http_to_s3 import HttpToS3Operator

            for i, img in enumerate(images):
                HttpToS3Operator(
                    task_id=f"http_{tag}_{i}",
                    http_conn_id="cdn",
                    endpoint=img["url"][len(args.api) :],
                    s3_bucket=args.bucket,
                    s3_key=f"http/{tag}/{i}",
                    replace=True,
                ).execute({})
        else:
            for i, path in enumerate(files):
                client.upload_file(path, args.bucket, f"file/{tag}/{i}")

    # Warm-up on a small image: imports, clients, pools and botocore models are loaded
    # before the baseline, so growth is what the copy itself costs.
    small = json.loads(Path(args.warmup).read_text())
    if args.contender == "flux":
        FluxToS3Operator(
            task_id="warm",
            source=small,
            s3_bucket=args.bucket,
            s3_key_prefix="warm",
            manifest_name=None,
            flux_conn_id="flux_bench",
            replace=True,
        ).execute({})
    elif args.contender == "http_to_s3":
        from airflow.providers.amazon.aws.transfers.http_to_s3 import HttpToS3Operator

        HttpToS3Operator(
            task_id="warm",
            http_conn_id="cdn",
            endpoint=small[0]["images"][0]["url"][len(args.api) :],
            s3_bucket=args.bucket,
            s3_key="warm/0",
            replace=True,
        ).execute({})
    else:
        client.put_object(Bucket=args.bucket, Key="warm/0", Body=b"x" * 1024)
    base_now, base_peak = _rss_now_mb(), _rss_peak_mb()
    started = time.perf_counter()
    run_once("run")
    wall = time.perf_counter() - started
    growth = max(0.0, _rss_peak_mb() - max(base_now, base_peak))
    # ru_maxrss only rises: when the warm-up peak already exceeded the copy's, fall back to
    # the growth over the RSS right before the copy.
    growth = max(growth, _rss_peak_mb() - base_now) if growth == 0 else growth
    total = sum(
        client.head_object(Bucket=args.bucket, Key=k["Key"])["ContentLength"]
        for k in client.list_objects_v2(
            Bucket=args.bucket,
            Prefix={"flux": "flux/run", "http_to_s3": "http/run", "upload_file": "file/run"}[args.contender],
        ).get("Contents", [])
    )
    print(json.dumps({"wall": wall, "rss_growth_mb": growth, "bytes": total}))


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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    for name in ("api", "s3", "bucket", "results", "warmup", "tmp"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print_header("Part 3: copying images to S3 (peak RSS growth and wall time)")
    cases = [("1 x 50 MB", 50 * MB, 1), ("1 x 100 MB", 100 * MB, 1), ("4 x 32 MB", 32 * MB, 4)]
    if args.quick:
        cases, args.rounds = cases[:1], 1
    port = free_port()
    s3_url = f"http://127.0.0.1:{port}"
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows, raw = [], []
    try:
        import boto3

        for _ in range(100):
            try:
                urllib.request.urlopen(f"{s3_url}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        boto3.client(
            "s3", endpoint_url=s3_url, region_name="us-east-1", aws_access_key_id="t", aws_secret_access_key="t"
        ).create_bucket(Bucket="bench-transfer")
        with Emulator(queue_seconds=0, run_seconds=0, real_images=True) as emu, tempfile.TemporaryDirectory() as tmp:
            warm = Path(tmp) / "warm.json"
            warm.write_text(json.dumps(_submit_big(emu, 200_000, 1)))
            for label, size, count in cases:
                results = Path(tmp) / f"{size}x{count}.json"
                results.write_text(json.dumps(_submit_big(emu, size, count)))
                figures: dict[str, dict[str, float | None]] = {}
                for contender in CONTENDERS:
                    walls, growths = [], []
                    for _ in range(args.rounds):
                        out = subprocess.run(
                            [
                                sys.executable,
                                __file__,
                                "--worker",
                                "--contender",
                                contender,
                                "--api",
                                emu.base_url,
                                "--s3",
                                s3_url,
                                "--bucket",
                                "bench-transfer",
                                "--results",
                                str(results),
                                "--warmup",
                                str(warm),
                                "--tmp",
                                tmp,
                            ],
                            capture_output=True,
                            text=True,
                            check=True,
                            cwd=REPO,
                        )
                        data = json.loads(out.stdout.strip().splitlines()[-1])
                        walls.append(data["wall"])
                        growths.append(data["rss_growth_mb"])
                        raw.append({"case": label, "contender": contender, **data})
                    figures[contender] = {"wall": median(walls), "growth": median(growths)}
                limit = figures["upload_file"]
                for contender in CONTENDERS:
                    f = figures[contender]
                    rows.append(
                        [
                            label,
                            LABELS[contender],
                            fmt(f["growth"], 1),
                            ratio(f["growth"], limit["growth"]),
                            fmt(f["wall"]),
                            ratio(f["wall"], limit["wall"]),
                        ]
                    )
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    print(
        md_table(
            ["case", "contender", "peak RSS growth MB (median)", "vs upload_file", "wall s (median)", "vs upload_file"],
            rows,
        )
    )
    print(f"\n{args.rounds} round(s) each, each round a fresh process. Command: `{command_line()}`")
    dump_json(args.json, raw)


if __name__ == "__main__":
    main()
