"""End to end on a real Airflow: scheduler, dag-processor, triggerer and api-server as processes.

Unlike ``dag.test()`` (which runs triggers in line, in the test process), this runs the
DAG in ``tests/system/dags`` the way production does: the scheduler hands the tasks to the
LocalExecutor, the sensor defers, the *triggerer* process imports ``FluxStatusTrigger`` from
its trigger row, looks the connection up itself and follows the emulator's status stream,
and the scheduler resumes the sensor on the trigger's event. Mid-wait the triggerer is
killed (SIGKILL) and a new one started: the wait resumes from the trigger row, with no
second submit.

The fal emulator runs in a thread of this process on 127.0.0.1; the Airflow processes get a
throw-away ``AIRFLOW_HOME`` (SQLite), their own port, and ``flux_default`` as an
``AIRFLOW_CONN_FLUX_DEFAULT`` environment variable holding the test token, which must then
appear in no log file and in no row of the metadata database (trigger kwargs decrypted).

The same Airflow then runs ``flux_system_reuse``, against a second emulator on its own
connection and a real S3 (moto server): a submit that dies after its submit is retried by
the scheduler and reuses its request; the run is cleared after its prompt list changed and
every request is paid for anew, each image in the manifest carrying its own prompt.

Last, ``flux_review_and_publish`` (the example DAG of ``dags/``, linked into the test's DAG
folder) runs on its own emulator and connection: its human-in-the-loop task waits for an
answer, which the test gives through the REST API as a user would, rejecting one image;
only the picked images are published, copied inside S3 from staging.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from airflow_flux.compat import HAS_TASK_STATE_STORE
from airflow_flux.emulator import FluxEmulator, Scenario
from tests.airflow_processes import AirflowProcesses
from tests.helpers import TOKEN, StatsdListener, moto_aws_conn, moto_s3_client, openlineage_events, releasing

if TYPE_CHECKING:
    from collections.abc import Iterator

    import requests

pytestmark = pytest.mark.timeout(420)

DAG_ID = "flux_system_submit_sensor"
RUN_ID = "system_test_run"
REUSE_DAG_ID = "flux_system_reuse"
REUSE_BUCKET = "flux-system"
REVIEW_DAG_ID = "flux_review_and_publish"
REVIEW_BUCKET = "flux-review"
LINEAGE_DAG_ID = "flux_system_lineage"
DAGS_FOLDER = Path(__file__).resolve().parent / "dags"
COMPONENTS: dict[str, list[str]] = {
    # --skip-serve-logs: no log server sockets (logs are local files here).
    "scheduler": ["scheduler", "--skip-serve-logs"],
    "dag-processor": ["dag-processor"],
    "triggerer": ["triggerer", "--skip-serve-logs"],
}


class _Airflow(AirflowProcesses):
    """Airflow with the LocalExecutor on SQLite: api-server, scheduler, dag-processor, triggerer."""

    def __init__(self, home: Path, flux_base_url: str, extra_env: dict[str, str] | None = None) -> None:
        self.db_path = home / "airflow.db"
        super().__init__(
            home,
            database_url=f"sqlite:///{self.db_path}",
            dags_folder=DAGS_FOLDER,
            flux_base_url=flux_base_url,
            components=COMPONENTS,
            env={
                "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": "4",
                "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.5",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "0",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
                # A killed triggerer's triggers go to the next one once its heartbeat is this old.
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "6",
                **(extra_env or {}),
            },
        )
        self.dag_id = DAG_ID

    def tails(self, lines: int = 60, *, task_logs: bool = True) -> str:
        return super().tails(lines, task_logs=task_logs)

    # ---- metadata DB (read only, next to the running scheduler)

    def query(self, sql: str) -> list[sqlite3.Row]:
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
        try:
            conn.row_factory = sqlite3.Row
            return conn.execute(sql).fetchall()
        finally:
            conn.close()


def _watch_run(
    af: _Airflow, timeout: float, on_deferred: Any = None, *, dag_id: str = DAG_ID, run_id: str = RUN_ID
) -> tuple[str, dict[str, str], list[str], list[dict[str, Any]]]:
    """Poll the run until it ends: (run state, task states, states seen for ``wait``, trigger rows)."""
    deadline = time.monotonic() + timeout
    wait_states: list[str] = []
    trigger_rows: list[dict[str, Any]] = []
    while True:
        af.check_alive()
        run = af.get(f"dags/{dag_id}/dagRuns/{run_id}")
        tis = af.get(f"dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        states = {ti["task_id"]: ti["state"] for ti in tis}
        state = states.get("wait")
        if state and (not wait_states or wait_states[-1] != state):
            wait_states.append(state)
            af.mark(f"wait:{state}")
        if state == "deferred" and not trigger_rows:
            # The trigger row only lives while the task is deferred: look at it now.
            trigger_rows = [dict(r) for r in af.query("SELECT * FROM trigger")]
            if trigger_rows and on_deferred is not None:
                on_deferred()
        if run["state"] in ("success", "failed"):
            return run["state"], states, wait_states, trigger_rows
        assert time.monotonic() < deadline, f"run still {run['state']} after {timeout:.0f}s: {states}"
        time.sleep(0.3)


def _token_leaks_in_db(af: _Airflow) -> list[str]:
    """Every table/column of the metadata DB holding the token, fernet-encrypted values included."""
    leaks = []
    tables = [r["name"] for r in af.query("SELECT name FROM sqlite_master WHERE type = 'table'")]
    for table in tables:
        for row in af.query(f'SELECT * FROM "{table}"'):
            for column, value in zip(row.keys(), tuple(row), strict=True):
                if isinstance(value, bytes):
                    value = value.decode("utf-8", errors="replace")
                if not isinstance(value, str):
                    continue
                plain = af.decrypt(value) if value.startswith("gAAAAA") else None
                if TOKEN in value or (plain and TOKEN in plain):
                    leaks.append(f"{table}.{column}")
    return leaks


@dataclass
class _Stack:
    """One real Airflow for the module's tests, with an emulator per DAG and a real S3."""

    af: _Airflow
    home: Path
    emu: FluxEmulator  # flux_default: the triggerer-kill test
    reuse_emu: FluxEmulator  # flux_reuse: the retry-and-clear test
    review_emu: FluxEmulator  # flux_review: the review-before-publishing test
    lineage_emu: FluxEmulator  # flux_lineage: the lineage-and-metrics test
    s3: Any
    statsd: StatsdListener  # every process's metrics ([metrics] statsd_on)
    openlineage: Path  # the openlineage provider's file transport writes one file per event here


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, moto_server: str) -> Iterator[_Stack]:
    started = time.monotonic()
    home = tmp_path_factory.mktemp("airflow_home")
    s3 = moto_s3_client(moto_server)
    s3.create_bucket(Bucket=REUSE_BUCKET)
    s3.create_bucket(Bucket=REVIEW_BUCKET)
    openlineage = home / "openlineage"
    openlineage.mkdir()
    statsd = StatsdListener()
    with (
        FluxEmulator(queue_seconds=3, run_seconds=12) as emu,
        FluxEmulator(queue_seconds=0.5, run_seconds=2) as reuse_emu,
        FluxEmulator(queue_seconds=0.5, run_seconds=1) as review_emu,
        FluxEmulator(queue_seconds=0.3, run_seconds=0.5) as lineage_emu,
        contextlib.closing(statsd),
    ):
        af = _Airflow(
            home,
            emu.base_url,
            extra_env={
                "AIRFLOW_CONN_FLUX_REUSE": json.dumps(
                    {"conn_type": "flux", "host": reuse_emu.base_url, "password": TOKEN}
                ),
                "AIRFLOW_CONN_FLUX_REVIEW": json.dumps(
                    {"conn_type": "flux", "host": review_emu.base_url, "password": TOKEN}
                ),
                "AIRFLOW_CONN_FLUX_LINEAGE": json.dumps(
                    {"conn_type": "flux", "host": lineage_emu.base_url, "password": TOKEN}
                ),
                "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(moto_aws_conn(moto_server)),
                # Lineage and metrics as a deployment would have them (without the openlineage
                # provider installed, as in the compat legs, the first is ignored).
                "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                    {"type": "file", "log_file_path": str(openlineage / "event")}
                ),
                **statsd.env(),
            },
        )
        try:
            af.cli("db", "migrate")
            af.mark("db migrated")
            af.start()
            af.wait_until("a healthy scheduler, triggerer and dag-processor", af.healthy, timeout=120)
            af.mark("healthy")
            for dag_id in (DAG_ID, REUSE_DAG_ID, REVIEW_DAG_ID, LINEAGE_DAG_ID):
                af.dag_id = dag_id
                af.wait_until(f"DAG {dag_id} to be parsed", af.dag_parsed, timeout=90)
            af.mark("dags parsed")
            yield _Stack(
                af=af,
                home=home,
                emu=emu,
                reuse_emu=reuse_emu,
                review_emu=review_emu,
                lineage_emu=lineage_emu,
                s3=s3,
                statsd=statsd,
                openlineage=openlineage,
            )
        except BaseException:
            print(f"\n---------- Airflow output (home {home}) ----------\n{af.tails()}")
            raise
        finally:
            af.stop()
            af.mark("stopped")
            print(f"\nphases (since start): {', '.join(af.timings)}; total {time.monotonic() - started:.1f}s")


@contextlib.contextmanager
def _tails_on_failure(stack: _Stack) -> Iterator[None]:
    try:
        yield
    except BaseException:
        print(f"\n---------- Airflow output (home {stack.home}) ----------\n{stack.af.tails()}")
        raise


def test_submit_and_deferred_sensor_on_real_scheduler_and_triggerer(stack: _Stack) -> None:
    af, emu, home = stack.af, stack.emu, stack.home
    # The generation is held running until the new triggerer has seen it run: the kill is always
    # mid-wait, and the task log always has the IN_PROGRESS line, however slow the restart.
    emu.add_scenario(Scenario(hold_run="running"), match="a fox seen by a real scheduler")
    killed_at: list[float] = []

    def resumed_and_seen_running() -> bool:
        return bool(killed_at) and any(
            r.time > killed_at[0] and "IN_PROGRESS" in r.statuses for r in emu.calls(kind="stream")
        )

    with _tails_on_failure(stack), releasing(emu, ("running", resumed_and_seen_running), timeout=240):
        af.cli("dags", "unpause", DAG_ID)
        af.cli("dags", "trigger", DAG_ID, "--run-id", RUN_ID)
        af.mark("triggered")

        def kill_triggerer_mid_wait() -> None:
            # Once the triggerer follows the request, it dies and a new one starts: the
            # wait must carry on from the trigger row alone (same request, no new submit).
            af.wait_until("the triggerer to open the status stream", lambda: emu.calls(kind="stream"), timeout=60)
            af.crash("triggerer")
            killed_at.append(time.time())
            af.mark("triggerer killed")
            af.start("triggerer")

        run_state, states, wait_states, trigger_rows = _watch_run(af, timeout=300, on_deferred=kill_triggerer_mid_wait)
        af.mark("run finished")

        # ---- the run, and the proof that the wait left the worker for the triggerer
        assert run_state == "success", states
        assert states == {"submit": "success", "wait": "success"}
        assert "deferred" in wait_states, f"'wait' was never seen deferred: {wait_states}"
        assert wait_states[-1] == "success"

        # ---- what the emulator saw: one paid submit, the status stream, all with the token
        assert len(emu.calls(kind="submit")) == 1, [r.kind for r in emu.requests]
        # One stream per triggerer: the first died with its triggerer, the new one resumed.
        assert len(emu.calls(kind="stream")) >= 2, [r.kind for r in emu.requests]
        assert emu.calls(kind="result"), [r.kind for r in emu.requests]
        api_calls = [r for r in emu.requests if r.kind in ("submit", "status", "stream", "result", "cancel")]
        assert all(r.authorization and TOKEN in r.authorization for r in api_calls)
        assert not emu.calls(kind="cancel")
        (request_id,) = emu.jobs

        # ---- the sensor's result, through the REST API and in the xcom table
        handle = af.get(f"dags/{DAG_ID}/dagRuns/{RUN_ID}/taskInstances/submit/xcomEntries/return_value")["value"]
        result = af.get(f"dags/{DAG_ID}/dagRuns/{RUN_ID}/taskInstances/wait/xcomEntries/return_value")["value"]
        handle, result = (json.loads(v) if isinstance(v, str) else v for v in (handle, result))
        assert handle["request_id"] == request_id
        assert result["request_id"] == request_id
        assert result["prompt"] == "a fox seen by a real scheduler"
        assert len(result["images"]) == 1 and result["images"][0]["url"]
        xcom_rows = af.query(f"SELECT task_id, key FROM xcom WHERE dag_id = '{DAG_ID}'")
        assert {(r["task_id"], r["key"]) for r in xcom_rows} >= {
            ("submit", "return_value"),
            ("wait", "return_value"),
        }

        # ---- the token: nowhere in the DB (trigger kwargs decrypted), nowhere in the logs
        assert trigger_rows, "no trigger row seen while 'wait' was deferred"
        for row in trigger_rows:
            assert row["classpath"] == "airflow_flux.triggers.flux.FluxStatusTrigger"
            kwargs = af.decrypt(row["kwargs"]) or row["kwargs"]
            assert request_id in kwargs and "flux_default" in kwargs
            assert TOKEN not in kwargs and TOKEN not in json.dumps(row, default=str)
        assert af.query(f"SELECT * FROM rendered_task_instance_fields WHERE dag_id = '{DAG_ID}'")
        assert _token_leaks_in_db(af) == []
        logs = [p for p in (home / "logs").rglob("*") if p.is_file()]
        task_logs = [p for p in logs if "dag_id=" in str(p)]
        assert len(task_logs) >= 2, logs
        leaking = [str(p) for p in [*logs, *af.outputs.values()] if TOKEN in p.read_text(errors="replace")]
        assert leaking == []

        # ---- the trigger's progress lines reached the sensor's task log
        wait_logs = "\n".join(
            p.read_text(errors="replace")
            for p in task_logs
            if f"dag_id={DAG_ID}" in str(p) and "task_id=wait" in str(p)
        )
        assert f"FLUX request {request_id} is IN_PROGRESS" in wait_logs
        assert f"FLUX request {request_id} completed with 1 image(s)." in wait_logs


def _manifest(stack: _Stack, run_id: str) -> dict[str, Any]:
    body = stack.s3.get_object(Bucket=REUSE_BUCKET, Key=f"reuse/{run_id}/manifest.json")["Body"].read()
    return json.loads(body)


def _tries(af: _Airflow, run_id: str, task_id: str) -> int:
    ti = af.get(f"dags/{REUSE_DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}")
    return int(ti["try_number"])


def test_retry_reuses_and_clear_after_a_list_change_submits_anew(stack: _Stack) -> None:
    """A retry after a lost worker reuses its request; a clear is a new run of the task.

    Run 1 maps over A, B, C; ``flaky_submit`` dies after its submit and its automatic retry
    reuses that request. Then the list becomes A, C, D (index 0 unchanged, index 1 moved,
    index 2 new) and the whole run is cleared: every submit pays anew, the unchanged index 0
    and ``flaky_submit`` included, and each image in the manifest carries its own prompt.
    """
    af, emu = stack.af, stack.reuse_emu
    run_id = "reuse_run"

    def submitted() -> list[str]:
        return [job.input["prompt"] for job in emu.jobs.values()]

    def check_manifest(prompts: list[str], request_ids: set[str]) -> None:
        manifest = _manifest(stack, run_id)
        images = manifest["images"]
        assert sorted(i["prompt"] for i in images) == sorted(prompts), images
        for image in images:
            assert image["status"] == "copied", image
            # The image is the very request of that prompt, and a request of this run.
            assert image["request_id"] in request_ids
            assert emu.jobs[image["request_id"]].input["prompt"] == image["prompt"]
            head = stack.s3.head_object(Bucket=REUSE_BUCKET, Key=image["key"])
            assert head["Metadata"]["flux-request-id"] == image["request_id"]

    with _tails_on_failure(stack):
        first = ["a fox A", "a fox B", "a fox C"]
        af.cli("variables", "set", "flux_system_prompts", json.dumps(first))
        af.cli("dags", "unpause", REUSE_DAG_ID)
        af.cli("dags", "trigger", REUSE_DAG_ID, "--run-id", run_id)
        af.mark("reuse run triggered")
        state, states, _, _ = _watch_run(af, timeout=180, dag_id=REUSE_DAG_ID, run_id=run_id)
        af.mark("reuse run finished")
        assert state == "success", states
        # flaky_submit failed after its submit and was retried: one request for it.
        assert _tries(af, run_id, "flaky_submit") == 2
        assert sorted(submitted()) == sorted([*first, "a fox submitted once per run"])
        check_manifest(first, set(emu.jobs))
        before = set(emu.jobs)

        second = ["a fox A", "a fox C", "a fox D"]
        af.cli("variables", "set", "flux_system_prompts", json.dumps(second))
        af.post(f"dags/{REUSE_DAG_ID}/dagRuns/{run_id}/clear", {"dry_run": False})
        af.mark("reuse run cleared")
        state, states, _, _ = _watch_run(af, timeout=180, dag_id=REUSE_DAG_ID, run_id=run_id)
        af.mark("cleared run finished")
        assert state == "success", states

        new = set(emu.jobs) - before
        assert sorted(emu.jobs[rid].input["prompt"] for rid in new) == sorted(
            [*second, "a fox submitted once per run"]
        ), "a clear must submit every request anew, unchanged inputs included"
        check_manifest(second, new)
        for index, prompt in enumerate(second):
            handle = af.get(
                f"dags/{REUSE_DAG_ID}/dagRuns/{run_id}/taskInstances/submit/xcomEntries/return_value", map_index=index
            )["value"]
            handle = json.loads(handle) if isinstance(handle, str) else handle
            assert handle["request_id"] in new and emu.jobs[handle["request_id"]].input["prompt"] == prompt
            assert handle["flux_conn_id"] == "flux_reuse"

        logs = "\n".join(
            p.read_text(errors="replace")
            for p in (stack.home / "logs").rglob("*")
            if p.is_file() and f"dag_id={REUSE_DAG_ID}" in str(p)
        )
        if HAS_TASK_STATE_STORE:
            # 3.3 keeps task state across a clear: the stored request is recognised and not reused.
            assert "was submitted before this task was cleared" in logs
        else:
            # Before 3.3 the record was a Variable, deleted when the task succeeded: none is left
            # to reuse, and none of this run's tasks leaves one behind.
            assert af.query("SELECT key FROM variable WHERE key LIKE 'airflow_flux.state.%'") == []
        assert _token_leaks_in_db(af) == []


def _review_answer(af: _Airflow, run_id: str, task_id: str, chosen: list[str]) -> requests.Response:
    """The answer a reviewer gives (README, "Review before publishing"): PATCH the task's hitlDetails."""
    path = f"dags/{REVIEW_DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails"
    return af.session.patch(f"{af.url}/api/v2/{path}", json={"chosen_options": chosen}, timeout=30)


def test_review_then_publish_only_the_picked_images(stack: _Stack) -> None:
    """The example DAG end to end: three images staged, the reviewer rejects the second through
    the REST API, the other two are published (S3-to-S3, same bytes) with a manifest of their own."""
    af, emu, s3 = stack.af, stack.review_emu, stack.s3
    run_id = "review_run"
    prompts = ["a heron in the reeds", "a rejected blurry cat", "a lantern on a jetty"]
    started = time.monotonic()
    with _tails_on_failure(stack):
        af.cli("dags", "unpause", REVIEW_DAG_ID)
        af.post(
            f"dags/{REVIEW_DAG_ID}/dagRuns",
            {
                "dag_run_id": run_id,
                "logical_date": None,
                "conf": {"prompts": prompts, "bucket": REVIEW_BUCKET, "flux_conn_id": "flux_review"},
            },
        )
        af.mark("review run triggered")

        def review_state() -> str | None:
            ti = af.get(f"dags/{REVIEW_DAG_ID}/dagRuns/{run_id}/taskInstances/review")
            run = af.get(f"dags/{REVIEW_DAG_ID}/dagRuns/{run_id}")
            assert run["state"] in ("queued", "running"), f"run {run['state']} before the review was answered"
            return ti["state"] if ti["state"] == "awaiting_input" else None

        af.wait_until("the review to await input", review_state, timeout=150)
        af.mark("review awaiting input")

        # ---- what the reviewer is shown: one choice per staged image, thumbnails from the gallery
        detail = af.get(f"dags/{REVIEW_DAG_ID}/dagRuns/{run_id}/taskInstances/review/-1/hitlDetails")
        staging_key = f"flux/review/staging/{run_id}/manifest.json"
        staging = json.loads(s3.get_object(Bucket=REVIEW_BUCKET, Key=staging_key)["Body"].read())
        staged = sorted(staging["images"], key=lambda i: prompts.index(i["prompt"]))
        order = [i["prompt"] for i in staging["images"]]  # the choices follow the manifest's order
        assert detail["multiple"] is True and detail["response_received"] is False
        assert detail["options"] == [f"{n}: {p}" for n, p in enumerate(order, start=1)] + ["0: none, publish nothing"]
        for image in staged:
            assert image["status"] == "copied"
            image_path = f"/flux-gallery/dags/{REVIEW_DAG_ID}/runs/{run_id}/images/{image['sha256']}"
            assert f"({image_path}?size=thumb)]({image_path}/view)" in detail["body"]
        resp = af.session.get(f"{af.url}{image_path}?size=thumb", timeout=30)
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("image/"), resp.text[:300]
        assert af.session.get(f"{af.url}{image_path}/view", timeout=30).status_code == 200

        # ---- the answer, through the REST API: everything but the blurry cat
        keep = [o for o in detail["options"] if not o.startswith("0:") and "blurry cat" not in o]
        resp = _review_answer(af, run_id, "review", keep)
        assert resp.status_code == 200, resp.text
        assert sorted(resp.json()["chosen_options"]) == sorted(keep)
        af.mark("review answered")
        state, states, _, _ = _watch_run(af, timeout=120, dag_id=REVIEW_DAG_ID, run_id=run_id)
        af.mark("review run finished")
        assert state == "success", states
        assert _review_answer(af, run_id, "review", keep).status_code == 409  # answered once, for good

        # ---- published: the picked images, byte for byte the staged ones, and their manifest
        published_prefix = f"flux/review/published/{run_id}"
        listing = s3.list_objects_v2(Bucket=REVIEW_BUCKET, Prefix=f"{published_prefix}/").get("Contents", [])
        manifest = json.loads(
            s3.get_object(Bucket=REVIEW_BUCKET, Key=f"{published_prefix}/manifest.json")["Body"].read()
        )
        picked = [i for i in staged if "blurry cat" not in i["prompt"]]
        (rejected,) = [i for i in staged if "blurry cat" in i["prompt"]]
        expected_keys = {i["key"].replace("/staging/", "/published/", 1) for i in picked}
        assert {o["Key"] for o in listing} == {*expected_keys, f"{published_prefix}/manifest.json"}
        assert sorted(i["key"] for i in manifest["images"]) == sorted(expected_keys)
        assert sorted(i["prompt"] for i in manifest["images"]) == sorted(i["prompt"] for i in picked)
        assert all(i["status"] == "copied" for i in manifest["images"])
        assert (manifest["dag_id"], manifest["run_id"], manifest["task_id"]) == (REVIEW_DAG_ID, run_id, "publish")
        for image in picked:
            staged_bytes = s3.get_object(Bucket=REVIEW_BUCKET, Key=image["key"])["Body"].read()
            key = image["key"].replace("/staging/", "/published/", 1)
            assert s3.get_object(Bucket=REVIEW_BUCKET, Key=key)["Body"].read() == staged_bytes
        # The rejected image stays in staging only, and the publish task lists it.
        assert rejected["key"].replace("/staging/", "/published/", 1) not in {o["Key"] for o in listing}
        s3.head_object(Bucket=REVIEW_BUCKET, Key=rejected["key"])
        result = af.get(f"dags/{REVIEW_DAG_ID}/dagRuns/{run_id}/taskInstances/publish/xcomEntries/return_value")[
            "value"
        ]
        result = json.loads(result) if isinstance(result, str) else result
        assert result["rejected"] == [{"prompt": rejected["prompt"], "staging_uri": rejected["s3_uri"]}]
        assert sorted(result["published"]) == sorted(f"s3://{REVIEW_BUCKET}/{k}" for k in expected_keys)

        # ---- nothing generated twice: one paid submit per prompt, all on the run's own connection
        assert sorted(job.input["prompt"] for job in emu.jobs.values()) == sorted(prompts)
        assert len(emu.calls(kind="submit")) == len(prompts)

        # ---- lineage of the publish (a TaskFlow task: through the hook lineage collector)
        if _has_openlineage():
            events = af.wait_until(
                "the publish's COMPLETE event",
                lambda: _complete_events(stack, REVIEW_DAG_ID, run_id).get("publish"),
                timeout=60,
            )
            bucket = f"s3://{REVIEW_BUCKET}"
            assert _names(events["inputs"]) == {
                (bucket, staging_key),
                *((bucket, i["key"]) for i in picked),
            }
            assert _names(events["outputs"]) == {(bucket, f"{published_prefix}/manifest.json")} | {
                (bucket, k) for k in expected_keys
            }
        print(f"\nreview test: {time.monotonic() - started:.1f}s ({', '.join(af.timings[-4:])})")


def _has_openlineage() -> bool:
    import importlib.util

    return importlib.util.find_spec("airflow.providers.openlineage") is not None


def _complete_events(stack: _Stack, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
    """The COMPLETE events of a run's tasks, by task id (the file transport's files)."""
    found = {}
    for event in openlineage_events(stack.openlineage):
        airflow = event.get("run", {}).get("facets", {}).get("airflow", {})
        if event.get("eventType") != "COMPLETE" or airflow.get("dagRun", {}).get("run_id") != run_id:
            continue
        job = event["job"]["name"]
        if job.startswith(f"{dag_id}."):
            found[job.removeprefix(f"{dag_id}.")] = event
    return found


def _names(datasets: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(d["namespace"], d["name"]) for d in datasets}


def test_lineage_and_metrics_of_an_edit_its_copy_and_a_batch(stack: _Stack) -> None:
    """What the openlineage provider's listener and a StatsD server get from a real run.

    An edit of ``s3://flux-system/in/x.jpg``, copied under ``lineage/{run_id}/``: the COMPLETE
    events name that input (namespace ``s3://flux-system``, name ``in/x.jpg``) and the copy's
    outputs under the prefix, with the request, seed and cost in the run facet ``flux``. A batch
    of three (one refused, allowed) names its results file. The metrics arrive at the StatsD
    server from the task processes, with the figures of the run.
    """
    pytest.importorskip("airflow.providers.openlineage")
    from PIL import Image

    af, emu, s3 = stack.af, stack.lineage_emu, stack.s3
    run_id = "lineage_run"
    emu.add_scenario(Scenario(result_error_always=422), match="refused")
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (20, 120, 220)).save(buf, format="JPEG")
    s3.put_object(Bucket=REUSE_BUCKET, Key="in/x.jpg", Body=buf.getvalue(), ContentType="image/jpeg")
    metrics = stack.statsd
    since = len(metrics.lines)  # the other tests' runs sent metrics to the same listener
    with _tails_on_failure(stack):
        af.cli("dags", "unpause", LINEAGE_DAG_ID)
        af.post(f"dags/{LINEAGE_DAG_ID}/dagRuns", {"dag_run_id": run_id, "logical_date": None})
        state, states, _, _ = _watch_run(af, timeout=150, dag_id=LINEAGE_DAG_ID, run_id=run_id)
        assert state == "success", states
        # The listener emits from a process of its own, after the task's state is set.
        events = af.wait_until(
            "the COMPLETE events of edit, copy and batch",
            lambda: (
                (found := _complete_events(stack, LINEAGE_DAG_ID, run_id)).keys() >= {"edit", "copy", "batch"} and found
            ),
            timeout=60,
        )
    the_input = ("s3://flux-system", "in/x.jpg")
    (request_id,) = [job.request_id for job in emu.jobs.values() if job.input.get("image_url")]

    edit = events["edit"]
    assert _names(edit["inputs"]) == {the_input}
    assert edit["outputs"] == []
    flux = edit["run"]["facets"]["flux"]
    assert flux["endpoint"] == "fal-ai/flux-pro/kontext"
    assert flux["requestIds"] == [request_id] and flux["requests"] == 1 and flux["images"] == 1
    assert flux["costUsd"] == 0.04 and len(flux["seeds"]) == 1

    copy = events["copy"]
    assert _names(copy["inputs"]) == {the_input}
    outputs = _names(copy["outputs"])
    listed = s3.list_objects_v2(Bucket=REUSE_BUCKET, Prefix=f"lineage/{run_id}/")["Contents"]
    assert outputs == {("s3://flux-system", o["Key"]) for o in listed}  # the image and the manifest
    assert ("s3://flux-system", f"lineage/{run_id}/manifest.json") in outputs and len(outputs) == 2
    assert copy["run"]["facets"]["flux"]["requestIds"] == [request_id]
    assert copy["run"]["facets"]["flux"]["images"] == 1

    batch = events["batch"]
    assert batch["inputs"] == []
    assert _names(batch["outputs"]) == {("s3://flux-system", f"flux/{LINEAGE_DAG_ID}/{run_id}/_results/batch.jsonl")}
    flux = batch["run"]["facets"]["flux"]
    assert flux["requests"] == 3 and len(flux["requestIds"]) == 3 and flux["images"] == 2
    assert flux["costUsd"] == 0.08
    # No token, no signed URL in any event.
    text = json.dumps(list(events.values()))
    assert TOKEN not in text and "Signature=" not in text and "X-Amz-" not in text

    # ---- the metrics: sent by the task processes as each outcome was learned
    def total(name: str) -> float:
        return sum(value for value, _ in metrics.values(f"airflow.flux.{name}", since))

    af.wait_until("the flux metrics", lambda: total("images_copied") >= 1, timeout=30)
    assert total("requests_completed") == 3  # the edit and two of the batch
    assert total("requests_failed") == 1
    assert round(total("cost_usd"), 6) == 0.12
    assert total("images_copied") == 1
    for timer in ("generation_time", "queue_time"):
        timings = metrics.values(f"airflow.flux.{timer}", since)
        assert len(timings) == 3 and {kind for _, kind in timings} == {"ms"}, timings
    assert all(value >= 0 for value, _ in metrics.values("airflow.flux.queue_time", since))
