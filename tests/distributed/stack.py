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
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.airflow_processes import AirflowProcesses
from tests.helpers import free_port, moto_aws_conn, port_taken

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = Path(__file__).resolve().parent / "dags"
#: Settings a test run shortens; a production deployment should review each (README,
#: "Production deployment").
FAST: dict[str, str] = {
    "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
    "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "10",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "30",
    "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
    # A triggerer whose heartbeat is this old loses its triggers to another.
    "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "6",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
    "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
    "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",
}


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

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    def start(self, attempts: int = 3) -> None:
        """initdb, then the server on a port that was free (PostgreSQL cannot bind port 0 and say
        which it got): if another process took the port meanwhile, on another one."""
        self.base.mkdir(parents=True, exist_ok=True)
        if self.user:  # initdb refuses to run as root: the cluster belongs to postgres
            entry = pwd.getpwnam(self.user)
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        _run(
            [str(_pg_bin("initdb")), "-D", str(self.data), "-U", "airflow", "--auth=trust", "-E", "UTF8"],
            user=self.user,
        )
        log = self.base / "postgres.log"
        for attempt in range(attempts):
            # Durability off: a test database that is thrown away at the end.
            options = (
                f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} -c fsync=off -c full_page_writes=off"
            )
            pg_ctl = [str(_pg_bin("pg_ctl")), "-D", str(self.data), "-l", str(log), "-o", options, "-w", "start"]
            try:
                _run(pg_ctl, user=self.user)
                break
            except subprocess.CalledProcessError:
                if attempt == attempts - 1 or not port_taken(log.read_text(errors="replace")):
                    raise
                self.port = free_port()
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
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, attempts: int = 3) -> None:
        """On a port that was free (for Redis, port 0 means no TCP at all): if another process
        took it meanwhile, on another one."""
        self.base.mkdir(parents=True, exist_ok=True)
        log = self.base / "redis.log"
        for attempt in range(attempts):
            if self._start(log):
                return
            if attempt == attempts - 1 or not port_taken(log.read_text(errors="replace")):
                raise RuntimeError(f"redis-server did not start: see {log}")
            self.port = free_port()

    def _start(self, log: Path) -> bool:
        """Start and wait for a PING (True); False if the server exited."""
        with log.open("wb") as out:
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
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        import redis

        deadline = time.monotonic() + 60
        while True:
            try:
                redis.Redis(host="127.0.0.1", port=self.port).ping()
                return True
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    return False
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer: see {log}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            if self.proc.poll() is None:
                self.proc.kill()


class CeleryAirflow(AirflowProcesses):
    """Airflow with the CeleryExecutor on PostgreSQL and Redis: two workers, two triggerers."""

    def __init__(self, home: Path, *, pg: Postgres, redis_url: str, flux_base_url: str, s3_url: str) -> None:
        self.pg = pg
        worker = ["celery", "worker", "-c", "4", "-s", "--without-mingle", "--without-gossip"]
        super().__init__(
            home,
            database_url=pg.url,
            dags_folder=DAGS_FOLDER,
            flux_base_url=flux_base_url,
            components={
                "scheduler": ["scheduler", "--skip-serve-logs"],
                "dag-processor": ["dag-processor"],
                "triggerer-1": ["triggerer", "--skip-serve-logs"],
                "triggerer-2": ["triggerer", "--skip-serve-logs"],
                "worker-1": [*worker, "-H", "w1@%h"],
                "worker-2": [*worker, "-H", "w2@%h"],
            },
            env={
                **FAST,
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": redis_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + pg.url,
                "AIRFLOW__CORE__PARALLELISM": "32",
                "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(moto_aws_conn(s3_url)),
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                # Each component names its own host (tests.distributed.hostnames), so the job
                # table says which triggerer holds which trigger.
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.distributed.hostnames.from_env",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                "C_FORCE_ROOT": "true",  # Celery refuses root otherwise; the sandbox and CI run as root
            },
        )

    def component_env(self, name: str) -> dict[str, str]:
        return {"FLUX_TEST_HOSTNAME": name}

    def triggerer_jobs(self) -> dict[int, str]:
        """TriggererJob ids -> the component that runs (or ran) each (its hostname)."""
        rows = self.pg.query("SELECT id, hostname FROM job WHERE job_type = 'TriggererJob'")
        return {int(job_id): str(hostname) for job_id, hostname in rows}
