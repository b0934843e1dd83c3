"""The production-shaped stack of the distributed tests, each part from installed binaries.

PostgreSQL (its own cluster: ``initdb``, ``pg_ctl``) as the metadata DB, Redis as the Celery
broker, and Airflow with the ``CeleryExecutor``: api-server, scheduler, dag-processor, two
Celery workers and two triggerers, every one its own process group on 127.0.0.1, in a
temporary folder, stopped at the end (also on failure or Ctrl-C). Heartbeats and timeouts
are tuned for test speed through environment variables only (see :data:`FAST`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from cryptography.fernet import Fernet, InvalidToken

from demo.airflow_api import AirflowApi
from tests.helpers import TOKEN, free_port, moto_aws_conn

AIRFLOW = Path(sys.executable).with_name("airflow")
REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = Path(__file__).resolve().parent / "dags"
#: Settings a test run shortens; a production deployment should review each (README,
#: "Production deployment").
FAST: dict[str, str] = {
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
    # A triggerer whose heartbeat is this old loses its triggers to another.
    "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "6",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
    "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",
}
STOP_GRACE = 15.0


def missing_binaries() -> list[str]:
    """What this machine lacks for the stack (Debian packages: postgresql, redis-server)."""
    missing = []
    if _pg_bin("initdb") is None:
        missing.append("postgresql (initdb, pg_ctl)")
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    return missing


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _run(args: list[str], *, user: str | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    if user:
        args = ["runuser", "-u", user, "--", *args]
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120, **kwargs)


class Postgres:
    """A PostgreSQL cluster of its own on a free port (as the ``postgres`` user when run as root)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        self.url = f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        if self.user:  # initdb refuses to run as root: the cluster belongs to postgres
            entry = pwd.getpwnam(self.user)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        _run(
            [str(_pg_bin("initdb")), "-D", str(self.data), "-U", "airflow", "--auth=trust", "-E", "UTF8"],
            user=self.user,
        )
        # Durability off: a test database that is thrown away at the end.
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=off -c full_page_writes=off"
        _run(
            [
                str(_pg_bin("pg_ctl")),
                "-D",
                str(self.data),
                "-l",
                str(self.base / "postgres.log"),
                "-o",
                options,
                "-w",
                "start",
            ],
            user=self.user,
        )
        _run([str(_pg_bin("createdb")), "-h", "127.0.0.1", "-p", str(self.port), "-U", "airflow", "airflow"])

    def stop(self) -> None:
        if self.data.exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _run([str(_pg_bin("pg_ctl")), "-D", str(self.data), "-m", "immediate", "stop"], user=self.user)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="airflow", dbname="airflow")
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(sql, args)
                return list(cursor.fetchall()) if cursor.description else []
        finally:
            conn.close()


class Redis:
    """A Redis server of its own on a free port, nothing persisted."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        log = (self.base / "redis.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.base),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis(host="127.0.0.1", port=self.port).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server did not start: see {self.base / 'redis.log'}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            if self.proc.poll() is None:
                self.proc.kill()


class CeleryAirflow(AirflowApi):
    """Airflow with the CeleryExecutor on PostgreSQL and Redis: every component a process group."""

    def __init__(self, home: Path, *, pg: Postgres, redis_url: str, flux_base_url: str, s3_url: str) -> None:
        self.home = home
        self.pg = pg
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dag_id = ""
        self.session = requests.Session()
        self.session.trust_env = False
        self.fernet_key = Fernet.generate_key().decode()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.outputs: dict[str, Path] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(FAST)
        env.update(
            {
                "PATH": f"{AIRFLOW.parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url,
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": redis_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + pg.url,
                "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__PARALLELISM": "32",
                "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
                "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": f"{self.url}/",
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__API_AUTH__JWT_SECRET": Fernet.generate_key().decode(),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                "AIRFLOW_CONN_FLUX_DEFAULT": json.dumps(
                    {"conn_type": "flux", "host": flux_base_url, "password": TOKEN}
                ),
                "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(moto_aws_conn(s3_url)),
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                # Each component names its own host (tests.distributed.hostnames), so the job
                # table says which triggerer holds which trigger.
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.distributed.hostnames.from_env",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                "C_FORCE_ROOT": "true",  # Celery refuses root otherwise; the sandbox and CI run as root
            }
        )
        self.env = env
        self.components: dict[str, list[str]] = {
            "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.port)],
            "scheduler": ["scheduler", "--skip-serve-logs"],
            "dag-processor": ["dag-processor"],
            "triggerer-1": ["triggerer", "--skip-serve-logs"],
            "triggerer-2": ["triggerer", "--skip-serve-logs"],
            "worker-1": ["celery", "worker", "-c", "4", "-H", "w1@%h", "-s", "--without-mingle", "--without-gossip"],
            "worker-2": ["celery", "worker", "-c", "4", "-H", "w2@%h", "-s", "--without-mingle", "--without-gossip"],
        }

    # ---- processes

    def cli(self, *args: str, timeout: float = 300) -> str:
        out = subprocess.run(
            [str(AIRFLOW), *args], env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout
        )
        assert out.returncode == 0, f"airflow {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def start(self, name: str | None = None) -> None:
        for component in [name] if name else list(self.components):
            runs = sum(1 for n in self.outputs if n.startswith(component))
            path = self.outputs[f"{component}#{runs}"] = self.home / f"{component}.{runs}.out"
            with path.open("wb") as out:
                self.procs[component] = subprocess.Popen(
                    [str(AIRFLOW), *self.components[component]],
                    env={**self.env, "FLUX_TEST_HOSTNAME": component},
                    cwd=self.home,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def crash(self, name: str) -> float:
        """SIGKILL a component and everything it started; returns when (epoch seconds)."""
        proc = self.procs.pop(name)
        killed = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        return killed

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"Airflow component(s) exited early: {dead}"

    def failure(self, message: str) -> Exception:
        return AssertionError(message)

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def tails(self, lines: int = 40) -> str:
        parts = []
        for name, path in self.outputs.items():
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
            parts.append(f"===== {name} ({path}) =====\n" + "\n".join(text))
        return "\n".join(parts)

    # ---- REST and the metadata DB

    def post(self, path: str, body: dict[str, Any]) -> Any:
        resp = self.session.post(f"{self.url}/api/v2/{path}", json=body, timeout=30)
        assert resp.ok, f"POST {path}: HTTP {resp.status_code}: {resp.text[:500]}"
        return resp.json()

    def unpause(self, dag_id: str) -> None:
        resp = self.session.patch(f"{self.url}/api/v2/dags/{dag_id}", json={"is_paused": False}, timeout=10)
        resp.raise_for_status()

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        return str(self.post(f"dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})["dag_run_id"])

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        tis: list[dict[str, Any]] = []
        while True:  # the REST API pages at 100
            page = self.get(f"dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100, offset=len(tis))
            tis.extend(page["task_instances"])
            if not page["task_instances"] or len(tis) >= page["total_entries"]:
                return tis

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float, on_tick: Any = None) -> str:
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(f"dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return str(run["state"])
            if on_tick is not None:
                on_tick()
            assert time.monotonic() < deadline, f"{dag_id} {run_id} still {run['state']} after {timeout:.0f}s"
            time.sleep(0.5)

    def triggerer_jobs(self) -> dict[int, str]:
        """TriggererJob ids -> the component that runs (or ran) each (its hostname)."""
        rows = self.pg.query("SELECT id, hostname FROM job WHERE job_type = 'TriggererJob'")
        return {int(job_id): str(hostname) for job_id, hostname in rows}

    def decrypt(self, value: str) -> str | None:
        try:
            return Fernet(self.fernet_key.encode()).decrypt(value.encode()).decode()
        except (InvalidToken, ValueError):
            return None
