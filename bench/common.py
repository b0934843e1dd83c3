"""Helpers shared by the benchmark scripts (run them as ``python bench/<script>.py``).

Nothing here imports Airflow: :func:`airflow_env` must run before anything does, so that
Airflow never touches ``~/airflow``.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
TOKEN = "bench-token-0123456789"


# ----------------------------------------------------------------------------- environment


def airflow_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Point Airflow at a throw-away home (in ``env``, default ``os.environ``) and return ``env``."""
    target = os.environ if env is None else env
    if not target.get("BENCH_AIRFLOW_HOME"):
        home = tempfile.mkdtemp(prefix="airflow-flux-bench-")
        target["BENCH_AIRFLOW_HOME"] = home
        # Child processes inherit it through the environment; the creator removes it.
        atexit.register(shutil.rmtree, home, ignore_errors=True)
    target["AIRFLOW_HOME"] = target["BENCH_AIRFLOW_HOME"]
    target["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    target["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
    target.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
    return target


def flux_conn(conn_id: str, base_url: str, env: dict[str, str] | None = None, **extra: Any) -> str:
    """Define a ``flux`` connection to ``base_url`` as an ``AIRFLOW_CONN_`` variable."""
    target = os.environ if env is None else env
    conn = {"conn_type": "flux", "host": base_url, "password": TOKEN, "extra": extra}
    target[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
    return conn_id


def http_conn(conn_id: str, base_url: str, env: dict[str, str] | None = None) -> str:
    """An ``http`` connection as a user of the http provider would set it up for fal:
    the auth header in the extra (the http hooks send extra keys as headers)."""
    target = os.environ if env is None else env
    conn = {"conn_type": "http", "host": base_url, "extra": {"Authorization": f"Bearer {TOKEN}"}}
    target[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
    return conn_id


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server in its own process on a free port, up and answering; yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command_line() -> str:
    """The command that produced this output, relative to the repository when possible."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(REPO)
    args = list(sys.argv)
    with contextlib.suppress(ValueError):
        args[0] = str(Path(args[0]).resolve().relative_to(REPO))
    return shlex.join([str(exe), *args])


# ----------------------------------------------------------------------------- machine facts


def _meminfo_gib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine_facts() -> dict[str, str]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{os.cpu_count()} cores ({_cpu_model()})",
        "memory": f"{_meminfo_gib():.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "airflow": _version("apache-airflow"),
        "http provider": _version("apache-airflow-providers-http"),
        "aiohttp": _version("aiohttp"),
        "load average (1/5/15 min)": load_average(),
    }


#: Set by bench/run_all.py: the machine facts go once at the top of RESULTS.md, not per part.
EMBEDDED = os.environ.get("FLUX_BENCH_EMBEDDED") == "1"


def print_header(title: str) -> None:
    print(f"## {title}\n")
    print(f"Command: `{command_line()}`\n")
    facts = machine_facts()
    if EMBEDDED:
        facts = {k: facts[k] for k in ("date", "load average (1/5/15 min)")}
    for key, value in facts.items():
        print(f"- {key}: {value}")
    print()


#: Goal checks of this run, in the order printed; written to the JSON for the summary.
GOALS: list[dict[str, Any]] = []


def goal(what: str, measured: str, met: bool | None, note: str = "") -> str:
    """Record one goal check; returns its verdict word (``met``/``MISSED``/``n/a``)."""
    GOALS.append({"goal": what, "measured": measured, "met": met, "note": note})
    return "n/a" if met is None else ("met" if met else "MISSED")


# ----------------------------------------------------------------------------- memory


def hwm_kb() -> float:
    """The kernel's peak RSS of this process (VmHWM), KiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    return float("nan")


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) so it covers what follows only."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def ratio(value: float | None, reference: float | None, digits: int = 1) -> str:
    if value is None or reference is None:
        return "-"
    if reference == 0:
        return "-" if value == 0 else "inf"
    return f"{value / reference:.{digits}f}x"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def percentile(values: Sequence[float], pct: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    k = (len(data) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def dump_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({**data, "goals": GOALS}, indent=1, default=str))


# ----------------------------------------------------------------------------- emulator


class Emulator:
    """The fal queue emulator in a separate process (``bench/_emulator.py``), on a free port.

    Admin calls are plain blocking urllib: make them outside the timed sections.
    """

    def __init__(
        self,
        *,
        queue_seconds: float = 1.0,
        run_seconds: float = 3.0,
        ping_interval: float = 15.0,
        url_mode: str = "self",
        real_images: bool = False,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.args = [
            sys.executable,
            str(BENCH / "_emulator.py"),
            "--port",
            str(self.port),
            "--queue-seconds",
            str(queue_seconds),
            "--run-seconds",
            str(run_seconds),
            "--ping-interval",
            str(ping_interval),
            "--url-mode",
            url_mode,
        ]
        if real_images:
            self.args.append("--real-images")
        self.args.extend(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(self.args, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "listening" not in line:
            self.stop()
            raise RuntimeError(f"emulator did not start: {line!r}")
        deadline = time.monotonic() + 10
        while True:
            try:
                self.admin("GET", "health")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def admin(self, method: str, what: str, body: Any = None, timeout: float = 120) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.base_url}/_emulator/{what}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")

    def scenario(self, match: str | None, **scenario: Any) -> None:
        self.admin("POST", "scenarios", {"match": match, "scenario": scenario})

    def requests(self) -> list[dict[str, Any]]:
        return self.admin("GET", "requests")

    def jobs(self) -> dict[str, dict[str, Any]]:
        return {j["request_id"]: j for j in self.admin("GET", "jobs")}

    def reset(self) -> None:
        self.admin("POST", "reset")


def calls_by_request(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """API calls per request id and kind, from the emulator's request log."""
    out: dict[str, dict[str, int]] = {}
    for rec in records:
        rid = rec.get("request_id")
        if rid:
            kinds = out.setdefault(rid, {})
            kinds[rec["kind"]] = kinds.get(rec["kind"], 0) + 1
    return out


def first_call_after_submit(records: list[dict[str, Any]]) -> dict[str, float]:
    """Per request id, the time of its first non-submit call (when its wait was set up)."""
    out: dict[str, float] = {}
    for rec in records:
        rid = rec.get("request_id")
        if rid and rec["kind"] != "submit" and rid not in out:
            out[rid] = rec["time"]
    return out


def submit_body(prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "output_format": "jpeg", "num_images": 1}


async def submit_many(
    base_url: str, prompts: Sequence[str], *, concurrency: int = 64, endpoint: str | None = None
) -> list[dict[str, Any]]:
    """Submit one request per prompt (plain aiohttp, as any client would) and return the handles."""
    import asyncio

    import aiohttp

    endpoint = endpoint or "fal-ai/flux-pro/kontext/text-to-image"
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def one(session: aiohttp.ClientSession, prompt: str) -> dict[str, Any]:
        async with sem:
            for attempt in range(5):
                try:
                    async with session.post(f"{base_url}/{endpoint}", json=submit_body(prompt), headers=headers) as r:
                        r.raise_for_status()
                        body = await r.json()
                        break
                except aiohttp.ClientError:
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
        return {k: body[k] for k in ("request_id", "status_url", "response_url", "cancel_url")}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        return list(await asyncio.gather(*(one(session, p) for p in prompts)))
