"""Helpers the tests share: the test token, a fast retry policy, DAG-run readers, local servers.

A plain module (tests import it by name); fixtures live in ``conftest.py``, which pytest
loads first and which sets up Airflow's environment before anything imports airflow.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow_flux.hooks.retry import RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from airflow_flux.emulator import FluxEmulator

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
    """A port that was free a moment ago: only for servers that cannot bind port 0 themselves and
    report it (Airflow's api-server, PostgreSQL, Redis); their start retries on a taken port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: How a server says its port was taken between :func:`free_port` and its own bind.
PORT_TAKEN = ("address already in use", "errno 98", "could not bind")


def port_taken(output: str) -> bool:
    """Whether a server's output says it could not bind its port (then start it on another)."""
    text = output.lower()
    return any(sign in text for sign in PORT_TAKEN)


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on while the block runs: bound by us, never listening,
    so a connection to it is refused (and no other process can take it meanwhile)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def start_server(args: list[str], health_url: str, *, timeout: float = 30, env: dict[str, str] | None = None):
    """Start a local server process (own memory and CPU, not the test's) and wait for its health URL.

    Returns the ``Popen``; the caller terminates it.
    """
    import subprocess
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


def start_announcing_server(args: list[str], pattern: str, *, timeout: float = 60, env: dict[str, str] | None = None):
    """Start a server process that binds port 0 and prints the port it got; returns ``(Popen, match)``.

    ``pattern`` (a regular expression) is looked for in the first line the process prints; the
    caller reads the port from the match and terminates the process.
    """
    import re
    import select
    import subprocess

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    match = re.search(pattern, line)
    if match is None:
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(f"{args[:3]} did not start: {line!r}")
    return proc, match


#: moto's S3 server in a process of its own, on a port the OS picks (printed on its first line).
_MOTO_SERVER = """
import os, signal, sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
port = server.get_host_and_port()[1]
os.environ["MOTO_PORT"] = str(port)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print(f"moto listening on {port}", flush=True)
while True:
    signal.pause()
"""


def start_moto_server(env: dict[str, str] | None = None):
    """A moto S3 server process on a port it bound itself: ``(Popen, url)``."""
    import sys

    proc, match = start_announcing_server([sys.executable, "-c", _MOTO_SERVER], r"moto listening on (\d+)", env=env)
    return proc, f"http://127.0.0.1:{match.group(1)}"


def start_emulator_process(*args: str, env: dict[str, str] | None = None):
    """``python -m airflow_flux.emulator --port 0 ARGS``: ``(Popen, base_url)``, the URL it announced."""
    import sys

    proc, match = start_announcing_server(
        [sys.executable, "-m", "airflow_flux.emulator", "--port", "0", *args],
        r"flux emulator listening on (http://\S+)",
        env={**(env or os.environ), "PYTHONUNBUFFERED": "1"},
    )
    return proc, match.group(1)


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


@contextlib.contextmanager
def releasing(
    emulator: FluxEmulator, *steps: tuple[str, Callable[[], bool]], timeout: float = 120
) -> Iterator[list[str]]:
    """Release the emulator's gates from a thread, each once its condition holds, in order.

    ``steps`` are ``(gate, condition)``: the thread waits until ``condition()`` is true, then
    releases ``gate``, then goes on to the next step. For code the test cannot step through
    itself (a ``dag.test()`` run, a trigger's loop): a job held at a gate (``Scenario.hold_queue``
    / ``hold_run``) stays in its state until the client has seen it, however slow the machine.
    Yields the gates released so far. On leaving, every step must have happened: a condition
    still false after ``timeout`` seconds releases the remaining gates (so the code under test
    can end) and fails the test.
    """
    released: list[str] = []
    missed: list[str] = []
    done = threading.Event()

    def met(condition: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if done.is_set() or time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def run() -> None:
        for gate, condition in steps:
            ok = not missed and met(condition)
            with contextlib.suppress(RuntimeError):  # the emulator stopped: nothing left to hold
                emulator.release(gate)
            (released if ok else missed).append(gate)

    thread = threading.Thread(target=run, name="releasing", daemon=True)
    thread.start()
    try:
        yield released
    finally:
        done.set()
        thread.join(timeout=30)
    assert not missed, f"gates released without their condition: {missed} (released in time: {released})"


def dag_bag(folder: str) -> Any:
    """Airflow's ``DagBag`` of ``folder`` (``airflow.dag_processing.dagbag`` from 3.2, ``airflow.models`` before)."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow 3.1
        from airflow.models.dagbag import DagBag  # type: ignore[no-redef]
    return DagBag(dag_folder=folder)


class StatsdListener:
    """A StatsD server in a thread, on a free UDP port of 127.0.0.1: every metric line it got.

    Point Airflow at it with ``AIRFLOW__METRICS__STATSD_ON=True``, ``..._STATSD_HOST`` and
    ``..._STATSD_PORT`` (:meth:`env`); :meth:`values` are the numbers a metric was sent with.
    """

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="statsd-listener", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except OSError:
                continue
            self.lines.extend(line for line in data.decode(errors="replace").splitlines() if line)

    def env(self) -> dict[str, str]:
        return {
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(self.port),
        }

    def values(self, name: str, since: int = 0) -> list[tuple[float, str]]:
        """``(value, type)`` of each line of metric ``name`` (``c`` counter, ``ms`` timer, ``g`` gauge),
        from line ``since`` on (``len(listener.lines)`` before a run: that run's)."""
        found = []
        for line in self.lines[since:]:
            metric, _, rest = line.partition(":")
            if metric == name:
                value, _, kind = rest.partition("|")
                found.append((float(value), kind.split("|")[0]))
        return found

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def openlineage_events(folder: Path) -> list[dict[str, Any]]:
    """The OpenLineage events the file transport wrote under ``folder`` (one JSON file each)."""
    import json

    events = []
    for path in sorted(folder.glob("*")):
        with contextlib.suppress(ValueError):
            events.append(json.loads(path.read_text()))
    return events
