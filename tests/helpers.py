"""Helpers the tests share: the test token, a fast retry policy, DAG-run readers, local servers.

A plain module (tests import it by name); fixtures live in ``conftest.py``, which pytest
loads first and which sets up Airflow's environment before anything imports airflow.
"""

from __future__ import annotations

from pathlib import Path

from airflow_flux.hooks.retry import RetryPolicy

REPO = Path(__file__).resolve().parent.parent

#: A token distinctive enough that finding it anywhere (logs, XCom, DB rows) is a leak.
TOKEN = "flux-test-token-7c1e9a4f0b"

#: Fast backoff so retry tests take milliseconds, with the same rules as production.
FAST_RETRY = RetryPolicy(max_attempts=4, initial_wait=0.01, max_wait=0.05, max_total=10)


def task_states(dr) -> dict[str, str]:
    return {
        f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: ti.state for ti in dr.get_task_instances()
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: list[str], health_url: str, *, timeout: float = 30, env: dict[str, str] | None = None):
    """Start a local server process (own memory and CPU, not the test's) and wait for its health URL.

    Returns the ``Popen``; the caller terminates it.
    """
    import subprocess
    import time
    import urllib.request

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(health_url, timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{args[:3]} did not start") from None
            time.sleep(0.1)


def xcom(dr, task_id: str, map_index: int = -1):
    (ti,) = [ti for ti in dr.get_task_instances() if ti.task_id == task_id and ti.map_index == map_index]
    return ti.xcom_pull(task_ids=task_id, map_indexes=map_index)


def moto_aws_conn(endpoint_url: str) -> dict:
    """An ``aws`` connection (JSON form) to a moto S3 server, as S3Hook and aiobotocore read it."""
    return {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
    }


def moto_s3_client(endpoint_url: str):
    """A boto3 S3 client of the test's own, on a moto S3 server."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
