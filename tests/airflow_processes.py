"""A real Airflow as the system tests run it: one process group per component, REST, stop.

Shared by ``tests/system`` (LocalExecutor on SQLite) and ``tests/distributed`` (CeleryExecutor
on PostgreSQL and Redis): each subclass adds its database, executor and components; the
environment, the process handling (start, crash, stop with nothing left behind) and the REST
calls are written once here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from cryptography.fernet import Fernet, InvalidToken

from demo.airflow_api import AirflowApi
from tests.helpers import TOKEN, free_port, port_taken

AIRFLOW = Path(sys.executable).with_name("airflow")
#: Seconds a component gets to stop on SIGTERM before its whole group is killed.
STOP_GRACE = 15.0


def _run_number(output_name: str) -> int:
    """``api-server#2`` -> 2: which start of a component an output is."""
    return int(output_name.rsplit("#", 1)[1])


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` of a file (or why it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


class AirflowProcesses(AirflowApi):
    """Airflow's components of one test, each its own process group, on 127.0.0.1.

    :param home: ``AIRFLOW_HOME`` (a temporary folder: outputs, logs, the CLI's log).
    :param database_url: the metadata DB's SQLAlchemy URL.
    :param dags_folder: the DAGs to run.
    :param flux_base_url: where ``flux_default`` points (an emulator).
    :param components: name -> ``airflow`` arguments; the api-server is added first.
    :param env: settings of this stack (executor, heartbeats...), over the shared ones.
    """

    def __init__(
        self,
        home: Path,
        *,
        database_url: str,
        dags_folder: Path,
        flux_base_url: str,
        components: dict[str, list[str]],
        env: dict[str, str],
    ) -> None:
        self.home = home
        self.dag_id = ""
        self.session = requests.Session()
        self.session.trust_env = False  # 127.0.0.1 only: no proxy from the environment
        self.fernet_key = Fernet.generate_key().decode()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.outputs: dict[str, Path] = {}
        self.timings: list[str] = []
        self._t0 = time.monotonic()
        self.components = {"api-server": []}  # its port: _use_port()
        self.components.update(components)
        # Inherit PATH, locale, ... but no AIRFLOW* setting of this process (tests/conftest.py
        # points AIRFLOW_HOME at the unit tests' home, and tests may set AIRFLOW_CONN_*).
        base = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        base.update(
            {
                "PATH": f"{AIRFLOW.parent}{os.pathsep}{base.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
                "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                # No login for the REST calls of the tests.
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__API__SECRET_KEY": Fernet.generate_key().decode(),
                "AIRFLOW__API_AUTH__JWT_SECRET": Fernet.generate_key().decode(),
                "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                "AIRFLOW_CONN_FLUX_DEFAULT": json.dumps(
                    {"conn_type": "flux", "host": flux_base_url, "password": TOKEN}
                ),
            }
        )
        base.update(env)
        self.env = base
        self._use_port(free_port())

    def _use_port(self, port: int) -> None:
        """Serve the api-server on ``port``: its arguments and every setting that names it."""
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.components["api-server"] = ["api-server", "--host", "127.0.0.1", "--port", str(port)]
        self.env["AIRFLOW__API__PORT"] = str(port)
        self.env["AIRFLOW__API__BASE_URL"] = f"{self.url}/"
        # Where task workers report to: the api-server.
        self.env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"{self.url}/execution/"

    def component_env(self, name: str) -> dict[str, str]:
        """Settings of one component only (none by default)."""
        return {}

    # ---- processes

    def mark(self, phase: str) -> None:
        """Record when a phase of the test was reached (printed at the end)."""
        self.timings.append(f"{phase} {time.monotonic() - self._t0:.1f}s")

    def cli(self, *args: str, timeout: float = 300) -> str:
        """``airflow <args>`` in this stack's environment; its output is kept in ``cli.log``."""
        out = subprocess.run(
            [str(AIRFLOW), *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        with (self.home / "cli.log").open("a") as fh:
            fh.write(f"$ airflow {' '.join(args)}  (exit {out.returncode})\n{out.stdout}{out.stderr}\n")
        assert out.returncode == 0, f"airflow {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
        return out.stdout

    def start(self, name: str | None = None, *, attempts: int = 3) -> None:
        """Start one component (again, after a crash) or all of them.

        Starting all returns once the api-server listens. Its port was free when chosen (the
        api-server cannot bind port 0 and say which it got): if another process took it
        meanwhile, everything starts again on another port.
        """
        if name is not None:
            self._start([name])
            return
        for attempt in range(attempts):
            self._start(list(self.components))
            if self._api_server_listens():
                self._log_in()
                return
            output = self.outputs[max((n for n in self.outputs if n.startswith("api-server#")), key=_run_number)]
            if attempt == attempts - 1 or not port_taken(tail(output, 200)):
                raise AssertionError(f"the api-server did not start:\n{tail(output)}")
            self.stop()
            self.procs.clear()
            self._use_port(free_port())

    def _log_in(self, timeout: float = 120) -> None:
        """The session's JWT cookie, as a browser gets it with ``simple_auth_manager_all_admins``.

        Airflow 3.3 lets such requests through without one; 3.1 and 3.2 answer 401. The app
        may still be starting when the port accepts connections: asked until it answers.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                resp = self.session.get(f"{self.url}/auth/token/login", allow_redirects=False, timeout=10)
                if resp.status_code in (302, 303, 307) or resp.status_code == 404:
                    return  # logged in (the cookie is in the session), or another auth manager
            time.sleep(0.5)
        raise AssertionError("the api-server did not hand out a token at /auth/token/login")

    def _api_server_listens(self, timeout: float = 240) -> bool:
        """Wait until the api-server accepts connections (True) or has exited (False)."""
        import socket

        proc = self.procs["api-server"]
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
            time.sleep(0.2)
        return proc.poll() is None

    def _start(self, components: list[str]) -> None:
        for component in components:
            runs = sum(1 for n in self.outputs if n.split("#")[0] == component)
            path = self.outputs[f"{component}#{runs}"] = self.home / f"{component}.{runs}.out"
            with path.open("wb") as out:
                # Own session and process group: stop() signals the whole group, so the
                # executor's workers, the trigger runner and uvicorn go with their parent.
                self.procs[component] = subprocess.Popen(
                    [str(AIRFLOW), *self.components[component]],
                    env={**self.env, **self.component_env(component)},
                    cwd=self.home,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

    def crash(self, name: str) -> float:
        """SIGKILL a component and everything it started, as a crash would; returns when (epoch)."""
        proc = self.procs.pop(name)
        killed = time.time()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        return killed

    def check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"Airflow component(s) exited early: {dead}"

    def stop(self) -> None:
        """SIGTERM every group, then SIGKILL what is left (a group may outlive its leader)."""
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

    def tails(self, lines: int = 60, *, task_logs: bool = False) -> str:
        """The end of every component's output and of the CLI's log (and of task logs), for a failure."""
        parts = [f"===== {name} ({path}) =====\n{tail(path, lines)}" for name, path in self.outputs.items()]
        parts.append(f"===== CLI =====\n{tail(self.home / 'cli.log', lines)}")
        if task_logs:
            for log in sorted((self.home / "logs").rglob("*")):
                if log.is_file() and "dag_id=" in str(log):
                    parts.append(f"===== {log.relative_to(self.home)} =====\n{tail(log, 40)}")
        return "\n".join(parts)

    # ---- REST API

    def failure(self, message: str) -> Exception:
        return AssertionError(message)

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
        """Poll the run until it ends; its final state."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(f"dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                return str(run["state"])
            if on_tick is not None:
                on_tick()
            assert time.monotonic() < deadline, f"{dag_id} {run_id} still {run['state']} after {timeout:.0f}s"
            time.sleep(0.5)

    # ---- secrets

    def decrypt(self, value: str) -> str | None:
        """A fernet value of the metadata DB in clear, or None if it is not one."""
        try:
            return Fernet(self.fernet_key.encode()).decrypt(value.encode()).decode()
        except (InvalidToken, ValueError):
            return None
