"""Issue #24: one batch of 1,000 to 100,000 prompts, and what it costs as it grows.

For each size N, in its own child process (so each peak RSS is that size's alone): a fresh
Airflow home (SQLite), the DAG ``FluxBatchGenerateOperator(results_s3_bucket=...)``
``>> FluxToS3Operator(source=batch.output)`` run by ``dag.test()``, against the fal queue
emulator (its own process: account concurrency C, T seconds per generation, tiny images)
and a moto S3 server (its own process). The prompts come in the run's conf.

Figures per size: the batch task's wall time against the floor ``ceil(N / C) x T`` (what the
API allows), the copy's wall time, the child's peak RSS, the XCom bytes of the run, the task
state bytes left and the largest trigger kwargs in the DB, the results file's size, the
submits paid for, the images listed in S3.

Run: ``python bench/batch_scale.py --sizes 1000 --concurrency 10 --seconds 3``
(``--no-copy`` skips the copy to S3; ``--input conf`` puts the prompts in the run's conf).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import REPO, TOKEN, Emulator, command_line, dump_json, fmt, md_table, moto_server, print_header

BUCKET = "flux-bench-scale"
DAG_FILE = """
from airflow.sdk import DAG, Param
from airflow_flux.operators import FluxBatchGenerateOperator
from airflow_flux.transfers import FluxToS3Operator
import os

with DAG(
    "flux_bench_scale",
    schedule=None,
    params={"requests": Param([], type=["array", "string"])},
    render_template_as_native_obj=True,
):
    batch = FluxBatchGenerateOperator(
        task_id="batch",
        requests="{{ params.requests }}",
        max_images=10**6,
        max_in_flight=int(os.environ["BENCH_MAX_IN_FLIGHT"]),
        poll_interval=0.5,
        max_poll_interval=2.0,
        wait_timeout=10**6,
        results_s3_bucket="%(bucket)s",
    )
    if os.environ.get("BENCH_COPY") == "1":
        FluxToS3Operator(task_id="to_s3", source=batch.output, s3_bucket="%(bucket)s", s3_key_prefix="{{ run_id }}")
"""


def child(size: int) -> dict[str, Any]:
    """In a fresh Airflow home: run the DAG once and read what it left in the DB."""
    from airflow.utils.db import initdb

    initdb()
    from airflow.dag_processing.dagbag import DagBag
    from airflow.settings import Session
    from sqlalchemy import text

    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("flux_bench_scale")
    requests: Any = os.environ.get("BENCH_REQUESTS_URI") or prompts_of(size)
    started = time.time()
    dr = dag.test(run_conf={"requests": requests})
    wall = time.time() - started
    with Session() as session:

        def scalar(sql: str) -> Any:
            return session.execute(text(sql)).scalar()

        tasks = {
            row[0]: (row[1], row[2])
            for row in session.execute(text("SELECT task_id, start_date, end_date FROM task_instance"))
        }
        figures = {
            "state": dr.state,
            "wall_s": wall,
            "xcom_bytes": scalar("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM xcom"),
            "task_state_bytes": scalar("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM task_state_store"),
            "task_state_rows": scalar("SELECT COUNT(*) FROM task_state_store"),
            "trigger_kwargs_max": scalar("SELECT COALESCE(MAX(LENGTH(kwargs)), 0) FROM trigger"),
            "conf_bytes": scalar("SELECT COALESCE(SUM(LENGTH(conf)), 0) FROM dag_run"),
            "tasks": {k: [str(v[0]), str(v[1])] for k, v in tasks.items()},
        }
        summary = session.execute(text("SELECT value FROM xcom WHERE task_id = 'batch'")).scalar()
        figures["summary"] = json.loads(summary) if isinstance(summary, str) else summary
    return figures


def prompts_of(size: int) -> list[str]:
    return [f"a scale fox number {i}, watercolour" for i in range(size)]


def _duration(task: list[str] | None) -> float | None:
    from datetime import datetime

    if not task or "None" in task:
        return None
    start, end = (datetime.fromisoformat(t) for t in task)
    return (end - start).total_seconds()


def run_size(
    size: int, *, concurrency: int, seconds: float, emulator: Emulator, s3_url: str, copy: bool, input_file: bool
) -> dict:
    uri = ""
    if input_file:
        key = f"_inputs/{size}.jsonl"
        body = "".join(json.dumps(p) + "\n" for p in prompts_of(size)).encode()
        _s3(s3_url).put_object(Bucket=BUCKET, Key=key, Body=body)
        uri = f"s3://{BUCKET}/{key}"
    home = tempfile.mkdtemp(prefix=f"flux-scale-{size}-")
    dags = Path(home, "dags")
    dags.mkdir()
    Path(dags, "flux_bench_scale.py").write_text(DAG_FILE % {"bucket": BUCKET})
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=home,
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
        AIRFLOW__STATE_STORE__MAX_VALUE_STORAGE_BYTES="65536",
        BENCH_MAX_IN_FLIGHT=str(2 * concurrency),
        BENCH_COPY="1" if copy else "0",
        BENCH_REQUESTS_URI=uri,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        AIRFLOW_CONN_FLUX_DEFAULT=json.dumps(
            {"conn_type": "flux", "host": emulator.base_url, "password": TOKEN, "extra": {"concurrency": concurrency}}
        ),
        AIRFLOW_CONN_AWS_DEFAULT=json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": s3_url, "region_name": "us-east-1"},
            }
        ),
    )
    out = Path(home, "figures.json")
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(size), "--out", str(out)],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=open(Path(home, "child.log"), "wb"),  # noqa: SIM115
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or not out.exists():
        raise RuntimeError(f"size {size}: the child failed; see {home}/child.log")
    figures = json.loads(out.read_text())
    figures["peak_rss_mb"] = usage.ru_maxrss / 1024
    figures["floor_s"] = math.ceil(size / concurrency) * seconds
    figures["batch_s"] = _duration(figures["tasks"].get("batch"))
    figures["copy_s"] = _duration(figures["tasks"].get("to_s3"))
    jobs = emulator.jobs()
    figures["submits"] = len(jobs)
    emulator.reset()
    uri = (figures.get("summary") or {}).get("results_uri", "")
    if uri:
        s3 = _s3(s3_url)
        key = uri.split("/", 3)[3]
        figures["results_bytes"] = s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
        if copy:
            count = 0
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=key.split("/")[2] + "/"):
                count += sum(1 for o in page.get("Contents", []) if not o["Key"].endswith(".json"))
            figures["images_listed"] = count
    return figures


def _s3(url: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000", help="comma-separated batch sizes")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0, help="generation time T")
    parser.add_argument("--no-copy", action="store_true")
    parser.add_argument("--input", choices=("file", "conf"), default="file", help="prompts in S3 or in the conf")
    parser.add_argument("--json")
    parser.add_argument("--child", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(child(args.child), default=str))
        return 0

    print_header("Batch scale (issue #24)")
    print(f"Command: {command_line()}\n")
    rows, results = [], {}
    with moto_server() as s3_url:
        _s3(s3_url).create_bucket(Bucket=BUCKET)
        with Emulator(
            queue_seconds=0, run_seconds=args.seconds, extra_args=["--concurrency", str(args.concurrency)]
        ) as emulator:
            for size in (int(s) for s in args.sizes.split(",")):
                f = run_size(
                    size,
                    concurrency=args.concurrency,
                    seconds=args.seconds,
                    emulator=emulator,
                    s3_url=s3_url,
                    copy=not args.no_copy,
                    input_file=args.input == "file",
                )
                results[size] = f
                ratio = f["batch_s"] / f["floor_s"] if f.get("batch_s") else None
                rows.append(
                    [
                        f"{size:,}",
                        f["state"],
                        f"{fmt(f['batch_s'], 1)} s / {fmt(f['floor_s'], 0)} s ({fmt(ratio, 3)}x)",
                        fmt(f.get("copy_s"), 1),
                        fmt(f["peak_rss_mb"], 0),
                        f"{f['xcom_bytes']:,}",
                        f"{f['conf_bytes']:,}",
                        f"{f['task_state_bytes']:,} ({f['task_state_rows']} rows)",
                        f"{f['trigger_kwargs_max']:,}",
                        f"{f.get('results_bytes', 0):,}",
                        f"{f['submits']:,}",
                        f"{f.get('images_listed', '-')}",
                    ]
                )
                print(
                    f"size {size}: {json.dumps({k: v for k, v in f.items() if k != 'tasks'}, default=str)}", flush=True
                )
    print()
    print(
        md_table(
            [
                "prompts",
                "run",
                "batch task wall / floor",
                "copy (s)",
                "peak RSS (MB)",
                "XCom (bytes)",
                "run conf (bytes)",
                "task state left (bytes)",
                "largest trigger kwargs (bytes)",
                "results file (bytes)",
                "submits",
                "images in S3",
            ],
            rows,
        )
    )
    dump_json(
        args.json,
        {"command": command_line(), "concurrency": args.concurrency, "seconds": args.seconds, "sizes": results},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
