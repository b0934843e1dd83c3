"""Processes of the demo: the fal queue emulator, a moto S3 server, and their clean stop.

Every child runs in its own session (process group), so stopping one signals all of its
descendants too, and a Ctrl-C in the terminal reaches only the demo itself, which then
stops its children in order. ``stop()`` runs from ``finally``; SIGTERM and SIGHUP are
turned into exceptions (:func:`signals_raise`) so that ``finally`` runs for them as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import FrameType

REPO = Path(__file__).resolve().parent.parent
DAGS_FOLDER = REPO / "dags"
#: The virtualenv's bin/ (airflow, python): children are started from it, nothing else.
BIN = Path(sys.executable).parent
FAL_QUEUE = "https://queue.fal.run"
DEMO_BUCKET = "flux-demo"
S3_REGION = "us-east-1"
STOP_GRACE = 15.0


class DemoError(RuntimeError):
    """A problem the demo explains in one sentence (no traceback for the user)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port (as servers do, despite TIME_WAIT leftovers)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"({exc})"


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise SystemExit, SIGINT raises KeyboardInterrupt.

    So ``finally`` blocks (which stop the children) run for all three. Only one signal is
    turned into an exception: repeats (a nervous double Ctrl-C) are ignored.
    """
    raised = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if raised:
            return
        raised = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """No signal can cut a cleanup short (main thread only; elsewhere a no-op)."""
    try:
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in _STOP_SIGNALS}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ProcessGroup:
    """Child processes, each the leader of its own session; stopped group by group."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in a new session; output to ``<log_dir>/<name>.log``, or a pipe with ``pipe``."""
        log = self.logs[name] = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd or REPO,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe else out,
                stderr=subprocess.STDOUT if pipe else out,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    @property
    def pgids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def check_alive(self, *names: str) -> None:
        for name in names or tuple(self.procs):
            proc = self.procs[name]
            if proc.poll() is not None:
                raise DemoError(f"{name} exited early (code {proc.returncode}); its log:\n{tail(self.logs[name])}")

    def stop(self, grace: float = STOP_GRACE, first_signal: int = signal.SIGTERM) -> None:
        """SIGTERM every group (newest first), wait up to ``grace``, then SIGKILL what is left."""
        with signals_ignored():
            self._stop(list(self.procs.values())[::-1], grace, first_signal)

    @staticmethod
    def _stop(procs: list[subprocess.Popen[bytes]], grace: float, first_signal: int) -> None:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, first_signal)
        deadline = time.monotonic() + grace
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:
            # A group can outlive its leader (task workers, trigger runner): always finish it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


def group_members(pgids: list[int]) -> list[int]:
    """Live processes (not zombies) in any of these process groups (Linux /proc)."""
    wanted, found = set(pgids), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            state, pgid = fields[0], int(fields[2])
            if pgid in wanted and state != "Z":
                found.append(int(stat.parent.name))
    return found


@dataclass(frozen=True)
class ApiTarget:
    """Where the ``flux_default`` connection points: the emulator or the real API."""

    base_url: str
    token: str
    auth_scheme: str | None = None  # None: the hook's default (Key on fal's hosts, else Bearer)
    real: bool = False

    @classmethod
    def from_env(cls) -> ApiTarget:
        """The real API, from FLUX_API_TOKEN, FLUX_API_BASE (default fal) and FLUX_API_AUTH."""
        token = os.environ.get("FLUX_API_TOKEN", "").strip()
        if not token:
            raise DemoError(
                "FLUX_DEMO_REAL=1 needs FLUX_API_TOKEN (and FLUX_API_BASE for an aggregator; "
                f"default {FAL_QUEUE}, fal direct)."
            )
        base = os.environ.get("FLUX_API_BASE", "").strip() or FAL_QUEUE
        if not re.match(r"^https?://[^/\s]+", base):
            raise DemoError(f"FLUX_API_BASE must be a URL with its scheme, got {base!r}")
        auth = os.environ.get("FLUX_API_AUTH", "").strip() or None
        return cls(base_url=base.rstrip("/"), token=token, auth_scheme=auth, real=True)

    def connection(self) -> dict[str, Any]:
        conn: dict[str, Any] = {"conn_type": "flux", "host": self.base_url, "password": self.token}
        if self.auth_scheme:
            conn["extra"] = {"auth_scheme": self.auth_scheme}
        return conn


class LocalServices:
    """The emulator (unless the real API is used) and a moto S3 server, on free loopback ports."""

    def __init__(self, procs: ProcessGroup) -> None:
        self.procs = procs
        self.api: ApiTarget | None = None
        self.s3_endpoint = ""

    @property
    def emulated(self) -> bool:
        """The API side is the fal queue emulator, whose images are labelled placeholders."""
        return self.api is not None and not self.api.real

    def start(
        self,
        api: ApiTarget | None,
        *,
        bucket: str,
        queue_seconds: float,
        run_seconds: float,
        say: Callable[[str, str, str], None],
    ) -> str:
        """The API side (the emulator, unless ``api`` is the real one), the S3 server and ``bucket``.

        :param say: ``say(what, where, note)`` reports each part as it comes up.
        :return: the mode, for the summary.
        """
        if api is None:
            api = self.start_emulator(queue_seconds=queue_seconds, run_seconds=run_seconds)
            mode = "fal queue emulator"
            say(mode, api.base_url, f"pid {self.procs.procs['emulator'].pid}")
        else:
            self.api = api
            mode = f"real API at {api.base_url}"
            say("REAL API", api.base_url, "every prompt is a paid request")
        say("moto S3 server", self.start_s3(), f"pid {self.procs.procs['moto-s3'].pid}")
        self.create_bucket(bucket)
        say("bucket", f"s3://{bucket}", "")
        return mode

    def start_emulator(self, *, queue_seconds: float, run_seconds: float, timeout: float = 30) -> ApiTarget:
        token = f"demo-{secrets.token_hex(8)}"  # the emulator accepts this token only
        proc = self.procs.start(
            "emulator",
            [
                str(BIN / "python"),
                "-m",
                "airflow_flux.emulator",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--token",
                token,
                "--queue-seconds",
                str(queue_seconds),
                "--run-seconds",
                str(run_seconds),
            ],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log = self.procs.logs["emulator"]
        deadline = time.monotonic() + timeout
        while not (found := re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))):
            self.procs.check_alive("emulator")
            if time.monotonic() > deadline:
                raise DemoError(f"The emulator (pid {proc.pid}) did not start within {timeout:.0f}s")
            time.sleep(0.05)
        self.api = ApiTarget(base_url=found.group(1), token=token)
        return self.api

    def start_s3(self, timeout: float = 30) -> str:
        port = free_port()
        self.procs.start("moto-s3", [str(BIN / "python"), "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                self.procs.check_alive("moto-s3")
                if time.monotonic() > deadline:
                    raise DemoError(f"The moto S3 server did not start within {timeout:.0f}s") from None
                time.sleep(0.1)
        self.s3_endpoint = url
        return url

    def aws_connection(self) -> dict[str, Any]:
        return {
            "conn_type": "aws",
            "login": "testing",
            "password": "testing",
            "extra": {"endpoint_url": self.s3_endpoint, "region_name": S3_REGION},
        }

    def s3_client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            region_name=S3_REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create_bucket(self, bucket: str) -> None:
        self.s3_client().create_bucket(Bucket=bucket)

    def airflow_env(self, home: Path, bucket: str, **extra: str) -> dict[str, str]:
        """The environment of the Airflow processes: this run's home, DAGs, connections, bucket.

        Nothing is written to the user's own Airflow: no AIRFLOW* variable of the calling
        shell is passed on, and connections and the bucket Variable live only in this env.
        """
        assert self.api is not None, "start the API target first"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            {
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONUNBUFFERED": "1",
                "AIRFLOW_HOME": str(home),
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
                "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
                "AIRFLOW_CONN_FLUX_DEFAULT": json.dumps(self.api.connection()),
                "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(self.aws_connection()),
                "AIRFLOW_VAR_FLUX_S3_BUCKET": bucket,
                # botocore defaults: never the user's AWS profile.
                "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            }
        )
        # Local servers are reached directly, whatever proxy the shell has configured.
        no_proxy = ",".join(p for p in (env.get("NO_PROXY") or env.get("no_proxy"), "127.0.0.1,localhost") if p)
        env["NO_PROXY"] = env["no_proxy"] = no_proxy
        env.update(extra)
        return env
