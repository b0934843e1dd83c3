"""``make demo-ui``: ``flux_content_pipeline`` on a real Airflow, with its UI on http://127.0.0.1:8080.

    python -m demo.ui [--port 8080] [--once] [--real] [--output demo-output]

What ``airflow standalone`` does (scheduler, dag-processor, triggerer and API server/UI
on SQLite with the LocalExecutor), started component by component so that every server
binds 127.0.0.1 only (standalone's log servers listen on all interfaces) and every
component can be stopped with its children. Alongside: the fal queue emulator and a moto
S3 server, as in ``make demo``. Nothing touches your own Airflow: a temporary
``AIRFLOW_HOME``, the repo's ``dags/``, connections as environment variables.

Once the DAG is parsed it is unpaused, and the scheduler starts today's ``@daily`` run
(``catchup=False``: the latest interval only). Watch the waits go *deferred* in the Grid
view, and its images in the Flux gallery (the banner prints both URLs); each finished run's
images are checked in S3 and written to ``demo-output/<run>/``. Press Trigger in the UI for
more runs. The connection form's Test button is on (``AIRFLOW__CORE__TEST_CONNECTION``).
Ctrl-C stops every process and exits 0 (1 if a finished run lost images).

``--once`` (or ``FLUX_DEMO_UI_ONCE=1``): wait for that run through the REST API
(``/api/v2/dags/flux_content_pipeline/dagRuns``), print its summary and exit: 0 if every
image landed (130 if Ctrl-C came first). ``FLUX_DEMO_REAL=1`` uses the real API, as in ``make demo``.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

if __package__ in (None, ""):  # run as a script: python demo/ui.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import requests

from demo.airflow_api import AirflowApi
from demo.services import (
    BIN,
    DEMO_BUCKET,
    ApiTarget,
    DemoError,
    LocalServices,
    ProcessGroup,
    free_port,
    port_free,
    signals_raise,
)
from demo.summary import Summary, parse_time, prepare_output, slug, summarize

if TYPE_CHECKING:
    from collections.abc import Sequence

DAG_ID = "flux_content_pipeline"
DEFAULT_PORT = 8080
#: Longer than make demo's, so the deferred waits are there to see in the UI.
QUEUE_SECONDS = 3.0
RUN_SECONDS = 12.0
COMPONENTS: dict[str, list[str]] = {
    # --skip-serve-logs: no log server on 0.0.0.0; the UI reads the local log files.
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}
FINISHED = ("success", "failed")
#: The name of airflow_flux's gallery plugin (airflow_flux.plugins.gallery.FluxGalleryPlugin).
GALLERY_PLUGIN = "flux_gallery"


class AirflowUI(AirflowApi):
    """The Airflow processes of the demo and the REST calls it makes to them."""

    def __init__(self, services: LocalServices, procs: ProcessGroup, home: Path, port: int) -> None:
        from cryptography.fernet import Fernet

        self.procs = procs
        self.home = home
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.dag_id = DAG_ID
        self.env = services.airflow_env(
            home,
            DEMO_BUCKET,
            AIRFLOW__CORE__EXECUTOR="LocalExecutor",
            AIRFLOW__CORE__PARALLELISM="4",
            AIRFLOW__CORE__FERNET_KEY=Fernet.generate_key().decode(),
            # A local demo: every visitor is admin, no password to find.
            AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
            # Airflow 3 turns the connection form's Test button off by default.
            AIRFLOW__CORE__TEST_CONNECTION="Enabled",
            AIRFLOW__API__HOST="127.0.0.1",
            AIRFLOW__API__PORT=str(port),
            AIRFLOW__API__BASE_URL=f"{self.url}/",
            AIRFLOW__API__WORKERS="1",
            AIRFLOW__API__SECRET_KEY=Fernet.generate_key().decode(),
            AIRFLOW__API_AUTH__JWT_SECRET=Fernet.generate_key().decode(),
            AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{self.url}/execution/",
            AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME="0.5",
            AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK="False",
            AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL="5",
            AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES="1",
            AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL="0",
            AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC="2",
        )
        self.session = requests.Session()
        self.session.trust_env = False  # 127.0.0.1 only: no proxy from the environment

    def migrate(self, timeout: float = 300) -> None:
        proc = self.procs.start("db-migrate", [str(BIN / "airflow"), "db", "migrate"], env=self.env, cwd=self.home)
        try:
            code = proc.wait(timeout=timeout)
        except Exception:
            raise DemoError(f"airflow db migrate did not finish within {timeout:.0f}s") from None
        if code != 0:
            raise DemoError(f"airflow db migrate exited {code}: see {self.procs.logs['db-migrate']}")

    def start(self) -> None:
        commands = {**COMPONENTS, "api-server": ["api-server", "--host", "127.0.0.1", "--port", str(self.port)]}
        for name, args in commands.items():
            self.procs.start(name, [str(BIN / "airflow"), *args], env=self.env, cwd=self.home)

    def check_alive(self) -> None:
        self.procs.check_alive(*COMPONENTS, "api-server")

    # ---- REST API (v2): reads, health and waiting come from AirflowApi

    def failure(self, message: str) -> Exception:
        return DemoError(f"{message}; logs in {self.home}")

    def unpause(self) -> None:
        resp = self.session.patch(f"{self.url}/api/v2/dags/{DAG_ID}", json={"is_paused": False}, timeout=10)
        resp.raise_for_status()

    def trigger(self) -> str:
        resp = self.session.post(f"{self.url}/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None}, timeout=10)
        resp.raise_for_status()
        return str(resp.json()["dag_run_id"])

    def gallery_url(self) -> str | None:
        """The DAG's page in the Flux gallery, as the loaded plugin declares it; None if it is not loaded."""
        for plugin in self.get("plugins", limit=1000)["plugins"]:
            if plugin["name"] != GALLERY_PLUGIN:
                continue
            for view in plugin.get("external_views") or []:
                if view.get("destination") == "dag" and view.get("href"):
                    # Without the view's query: it asks for the layout embedded in Airflow's
                    # Images tab, and this URL opens a browser tab of its own.
                    path = urlsplit(view["href"]).path.replace("{DAG_ID}", DAG_ID)
                    return urljoin(f"{self.url}/", path)
        return None

    def runs(self) -> list[dict[str, Any]]:
        return list(self.get(f"dags/{DAG_ID}/dagRuns", order_by="start_date", limit=100)["dag_runs"])

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        tis = self.get(f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", limit=1000)["task_instances"]
        for ti in tis:
            if ti["state"] == "success" and ti["task_id"] in ("load_prompts", "wait"):
                ti["return_value"] = self.xcom(run_id, ti["task_id"], ti["map_index"])
        return list(tis)

    def xcom(self, run_id: str, task_id: str, map_index: int) -> Any:
        path = f"dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value"
        value = self.get(path, map_index=map_index, deserialize=True)["value"]
        if isinstance(value, str):  # stringified by the API: JSON, or a Python repr
            for parse in (json.loads, ast.literal_eval):
                try:
                    return parse(value)
                except (ValueError, SyntaxError):
                    continue
        return value


class _Watcher:
    """Prints what changes in the DAG's runs and task instances, like make demo's progress."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seen: dict[str, str] = {}
        self.failures = 0  # finished runs whose images did not all land

    def say(self, text: str) -> None:
        print(f"  {time.monotonic() - self.started:6.1f}s  {text}", flush=True)

    def update(self, key: str, state: str | None, text: str) -> None:
        state = state or "none"
        if self.seen.get(key) != state:
            self.seen[key] = state
            self.say(text.format(state=state))


def run_ui(
    *,
    port: int = DEFAULT_PORT,
    once: bool = False,
    real: bool = False,
    output_dir: Path,
    queue_seconds: float = QUEUE_SECONDS,
    run_seconds: float = RUN_SECONDS,
    timeout: float = 600,
    keep: bool = False,
) -> int:
    """Start everything, watch runs, stop everything. Returns the exit code."""
    api = ApiTarget.from_env() if real else None
    if port and not port_free(port):
        raise DemoError(f"Port {port} on 127.0.0.1 is in use: pass --port N (or FLUX_DEMO_UI_PORT=N), 0 for any")
    port = port or free_port()
    prepare_output(output_dir)
    work = Path(tempfile.mkdtemp(prefix="flux-demo-ui-"))
    home = work / "airflow_home"
    home.mkdir()
    procs = ProcessGroup(work)
    services = LocalServices(procs)
    watcher = _Watcher()
    discard = False  # the temporary folder goes unless a run failed (or --keep)
    try:
        with signals_raise():
            try:
                code = _start_and_watch(
                    services,
                    procs,
                    home,
                    port,
                    api,
                    watcher,
                    output_dir,
                    once=once,
                    timeout=timeout,
                    queue_seconds=queue_seconds,
                    run_seconds=run_seconds,
                )
                discard = code == 0
                return code
            except KeyboardInterrupt:
                discard = watcher.failures == 0
                if once:
                    raise  # --once promised a checked run: an interrupted one is not
                # Ctrl-C is how this mode ends (make would print "Error 130" for a non-zero
                # code): the stop below is a success unless a finished run lost images.
                return 1 if watcher.failures else 0
            except SystemExit:
                discard = watcher.failures == 0
                raise
            finally:
                procs.stop()
                print(f"Stopped {len(procs.procs)} process(es) the demo started.", flush=True)
    finally:
        if discard and not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"Logs and the temporary Airflow home are kept in {work}", flush=True)


def _start_and_watch(
    services: LocalServices,
    procs: ProcessGroup,
    home: Path,
    port: int,
    api: ApiTarget | None,
    watcher: _Watcher,
    output_dir: Path,
    *,
    once: bool,
    timeout: float,
    queue_seconds: float,
    run_seconds: float,
) -> int:
    mode = services.start(
        api,
        bucket=DEMO_BUCKET,
        queue_seconds=queue_seconds,
        run_seconds=run_seconds,
        say=lambda what, where, note: watcher.say(f"{what} {where}" + (f" ({note})" if note else "")),
    )
    af = AirflowUI(services, procs, home, port)
    watcher.say(f"airflow db migrate (AIRFLOW_HOME {home})")
    af.migrate()
    af.start()
    pids = ", ".join(f"{n} {procs.procs[n].pid}" for n in (*COMPONENTS, "api-server"))
    watcher.say(f"started {pids}; waiting for them to be healthy")
    af.wait_until("a healthy scheduler, triggerer and dag-processor", af.healthy, timeout=180)
    af.wait_until(f"DAG {DAG_ID} to be parsed", af.dag_parsed, timeout=120)
    af.unpause()
    watcher.say(f"{DAG_ID} unpaused: the scheduler starts today's @daily run")
    gallery = af.gallery_url() or f"(the gallery plugin is not loaded: see {procs.logs['api-server']})"
    print(
        f"\n  Airflow UI:       {af.url}/dags/{DAG_ID}   (no login: everyone is admin in this demo)\n"
        f"  Flux gallery:     {gallery}   (the DAG's images; also Browse -> Flux gallery)\n"
        "  Connection test:  enabled (AIRFLOW__CORE__TEST_CONNECTION=Enabled): Admin -> Connections, Test\n"
        f"  Logs: {procs.log_dir}/*.log, task logs in {home}/logs (kept after exit with --keep or on failure)\n"
        + ("" if once else "  Press Ctrl-C to stop everything.\n"),
        flush=True,
    )
    return _watch(af, services, watcher, output_dir, mode, once=once, timeout=timeout)


def _watch(
    af: AirflowUI,
    services: LocalServices,
    watcher: _Watcher,
    output_dir: Path,
    mode: str,
    *,
    once: bool,
    timeout: float,
) -> int:
    deadline = time.monotonic() + timeout
    reported: set[str] = set()
    first_seen = time.monotonic()
    code = 0
    while True:
        af.check_alive()
        runs = af.runs()
        if not runs and time.monotonic() - first_seen > 60:
            watcher.say(f"no scheduled run yet: triggered {af.trigger()}")
            first_seen = float("inf")
        for run in runs:
            rid = run["dag_run_id"]
            watcher.update(f"run {rid}", run["state"], f"run {rid}: {{state}}")
            if rid in reported:
                continue
            for ti in af.get(f"dags/{DAG_ID}/dagRuns/{rid}/taskInstances", limit=1000)["task_instances"]:
                if ti["state"] is None:  # not scheduled yet (or a mapped task not expanded yet)
                    continue
                name = ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")
                watcher.update(f"{rid} {name}", ti["state"], f"{name:<12} {{state}}")
            if run["state"] in FINISHED:
                reported.add(rid)
                summary = _summarize(af, services, run, output_dir, mode)
                print("\n" + summary.render() + "\n", flush=True)
                if not summary.ok:
                    watcher.failures += 1
                    code = 1
                if once:
                    return code
        if once and time.monotonic() > deadline:
            raise DemoError(f"No run of {DAG_ID} finished within {timeout:.0f}s")
        time.sleep(1.0)


def _summarize(af: AirflowUI, services: LocalServices, run: dict[str, Any], output_dir: Path, mode: str) -> Summary:
    rid = run["dag_run_id"]
    folder = output_dir / slug(rid, limit=80)
    folder.mkdir(parents=True, exist_ok=True)
    seconds = None
    if run.get("start_date") and run.get("end_date"):
        start, end = parse_time(run["start_date"]), parse_time(run["end_date"])
        seconds = round((end - start).total_seconds(), 1) if start and end else None
    return summarize(
        s3=services.s3_client(),
        bucket=DEMO_BUCKET,
        dag_id=DAG_ID,
        run_id=rid,
        state=run["state"],
        task_instances=af.task_instances(rid),
        output_dir=folder,
        mode=f"real Airflow, {mode}",
        emulator=services.emulated,
        seconds=seconds,
    )


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def main(argv: Sequence[str] | None = None) -> int:
    from demo.run_demo import DEFAULT_OUTPUT

    parser = argparse.ArgumentParser(
        prog="python -m demo.ui", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("FLUX_DEMO_UI_PORT", DEFAULT_PORT)), help="UI port, 0: any"
    )
    parser.add_argument("--once", action="store_true", default=_env_flag("FLUX_DEMO_UI_ONCE"), help="one run, exit")
    parser.add_argument("--real", action="store_true", default=_env_flag("FLUX_DEMO_REAL"), help="the real API")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder for the images (emptied first)")
    parser.add_argument("--queue-seconds", type=float, default=QUEUE_SECONDS, help="emulator: time in the queue")
    parser.add_argument("--run-seconds", type=float, default=RUN_SECONDS, help="emulator: time running")
    parser.add_argument("--timeout", type=float, default=600, help="--once: seconds to wait for the run")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary Airflow home and logs (kept on failure)"
    )
    args = parser.parse_args(argv)
    print(f"airflow-flux UI demo: {DAG_ID} on a real scheduler, triggerer and API server", flush=True)
    try:
        return run_ui(
            port=args.port,
            once=args.once,
            real=args.real,
            output_dir=args.output.resolve(),
            queue_seconds=args.queue_seconds,
            run_seconds=args.run_seconds,
            timeout=args.timeout,
            keep=args.keep,
        )
    except (DemoError, FileExistsError) as exc:
        print(f"demo-ui: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("demo-ui: interrupted; every process it started is stopped.", file=sys.stderr)
        return 130
    except SystemExit as exc:
        print("demo-ui: terminated; every process it started is stopped.", file=sys.stderr)
        return int(exc.code or 1)


if __name__ == "__main__":
    sys.exit(main())
