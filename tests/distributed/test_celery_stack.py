"""The provider on the stack people deploy, with its processes killed mid-run.

``make test-distributed`` (and ``make test``): PostgreSQL, Redis, the emulator and a moto
S3 server, and Airflow with the CeleryExecutor (api-server, scheduler, dag-processor, two
Celery workers, two triggerers), all on 127.0.0.1 (see :mod:`tests.distributed.stack`).
Sized for 2 cores: 24 prompts; the README says how the figures scale.

Without ``initdb``/``redis-server`` the tests are skipped with what to install, unless
``FLUX_REQUIRE_DISTRIBUTED=1`` (CI sets it), which makes that a failure.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from airflow_flux.emulator import FluxEmulator, Scenario
from tests.distributed.conftest import FIGURES
from tests.distributed.stack import CeleryAirflow, Postgres, Redis, missing_binaries
from tests.helpers import TOKEN, moto_s3_client

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.timeout(600)

PROMPTS = [f"a distributed fox, take {i:02d}" for i in range(24)]
BUCKET = "flux-distributed"


class Stack:
    def __init__(self, base: Path, emu: FluxEmulator, s3: Any, af: CeleryAirflow) -> None:
        self.base, self.emu, self.s3, self.af = base, emu, s3, af


@pytest.fixture(scope="module")
def stack(moto_server: str) -> Iterator[Stack]:
    missing = missing_binaries()
    if missing:
        message = f"needs {', '.join(missing)} (Debian: apt-get install postgresql redis-server)"
        if os.environ.get("FLUX_REQUIRE_DISTRIBUTED") == "1":
            pytest.fail(f"FLUX_REQUIRE_DISTRIBUTED=1 but this machine {message}")
        pytest.skip(message)
    base = Path(tempfile.mkdtemp(prefix="flux-distributed-", dir="/tmp"))
    base.chmod(0o755)  # the postgres user reaches its cluster below
    started = time.monotonic()
    pg, redis = Postgres(base / "pg"), Redis(base / "redis")
    s3 = moto_s3_client(moto_server)
    s3.create_bucket(Bucket=BUCKET)
    # The triggerer-kill tests hold their generations running (Scenario.hold_run) until the kill
    # is over; the others' last long enough to be mid-run when their process is killed.
    with FluxEmulator(queue_seconds=2, run_seconds=25, token=TOKEN) as emu:
        af: CeleryAirflow | None = None
        try:
            # First: their ports are final once they run (a taken one is replaced at start).
            pg.start()
            redis.start()
            af = CeleryAirflow(
                base / "airflow_home", pg=pg, redis_url=redis.url, flux_base_url=emu.base_url, s3_url=moto_server
            )
            af.home.mkdir(parents=True)
            af.cli("db", "migrate")
            af.start()
            af.wait_until("a healthy Airflow", af.healthy, timeout=240)
            for dag_id in ("flux_dist_pipeline", "flux_dist_killed_submit", "flux_dist_batch", "flux_dist_window"):
                af.dag_id = dag_id
                af.wait_until(f"{dag_id} to be parsed", af.dag_parsed, timeout=120)
                af.unpause(dag_id)
            FIGURES.append(
                (
                    "start-up",
                    "healthy",
                    f"PostgreSQL, Redis and 7 Airflow processes in {time.monotonic() - started:.0f} s",
                )
            )
            yield Stack(base, emu, s3, af)
        except BaseException:
            if af is not None:
                print(f"\n---------- Airflow output ({af.home}) ----------\n{af.tails(40)}")
            raise
        finally:
            if af is not None:
                af.stop()
            redis.stop()
            pg.stop()


def _submits(emu: FluxEmulator, prompt_prefix: str) -> int:
    return sum(1 for job in emu.jobs.values() if job.input.get("prompt", "").startswith(prompt_prefix))


def _busiest_triggerer(af: CeleryAirflow) -> tuple[str, int, set[int]]:
    """The triggerer component holding the most trigger rows: (name, job id, trigger ids)."""
    jobs = af.triggerer_jobs()
    held: dict[int, set[int]] = {}
    for trigger_id, job_id in af.pg.query("SELECT id, triggerer_id FROM trigger WHERE triggerer_id IS NOT NULL"):
        held.setdefault(int(job_id), set()).add(int(trigger_id))
    job_id = max(held, key=lambda j: len(held[j]))
    return jobs[job_id], job_id, held[job_id]


def _kill_the_busiest_triggerer(af: CeleryAirflow, emu: FluxEmulator, gate: str, *, waits: int) -> dict[str, Any]:
    """With ``waits`` requests held running at ``gate``, once as many triggers are running,
    SIGKILL the triggerer holding the most of them, time until the other has taken every one
    of them over, then release the requests.

    The requests cannot complete before the release, so the kill always finds every wait
    deferred and the taken-over ones still waiting, however slow the machine.
    """

    def ready() -> bool:
        held = af.pg.query("SELECT count(*) FROM trigger WHERE triggerer_id IS NOT NULL")[0][0]
        return held >= waits

    af.wait_until(f"{waits} running triggers", ready, timeout=300)
    name, job_id, triggers = _busiest_triggerer(af)
    killed = af.crash(name)

    def taken_over() -> bool:
        rows = af.pg.query("SELECT id, triggerer_id FROM trigger WHERE id = ANY(%s)", list(triggers))
        return all(t is not None and int(t) != job_id for _, t in rows)

    af.wait_until("the other triggerer to take the triggers over", taken_over, timeout=120, interval=0.2)
    takeover = time.time() - killed
    af.start(name)  # two triggerers again for the next scenarios
    released = emu.release(gate)
    return {"name": name, "triggers": len(triggers), "killed_at": killed, "takeover_s": takeover, "released": released}


def _manifest(s3: Any, key: str) -> dict[str, Any]:
    return json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


def test_a_24_prompt_pipeline_survives_its_busiest_triggerer_being_killed(stack: Stack) -> None:
    af, emu = stack.af, stack.emu
    started = time.monotonic()
    # Every generation held running until the kill is over: all 24 waits deferred at once.
    emu.add_scenario(Scenario(hold_run="pipeline"), match="a distributed fox")
    run_id = af.trigger("flux_dist_pipeline", {"prompts": PROMPTS})
    kill = _kill_the_busiest_triggerer(af, emu, "pipeline", waits=24)
    # 24 waits on 2 triggerers: the busiest held at least half.
    assert kill["triggers"] >= 12 and kill["released"] == 24, kill
    state = af.wait_for_run("flux_dist_pipeline", run_id, timeout=400)
    assert state == "success", af.task_instances("flux_dist_pipeline", run_id)
    assert _submits(emu, "a distributed fox") == 24, "a killed triggerer made a wait pay again"
    # The taken-over waits followed their request again: each got a new status stream.
    resumed = []
    for job in emu.jobs.values():
        after = [
            c.time for c in emu.calls(kind="stream") if c.request_id == job.request_id and c.time > kill["killed_at"]
        ]
        if after:
            resumed.append(min(after) - kill["killed_at"])
    assert len(resumed) >= kill["triggers"], "a taken-over wait never followed its request again"
    manifest = _manifest(stack.s3, f"dist/{run_id}/manifest.json")
    copied = [i for i in manifest["images"] if i["status"] == "copied"]
    assert len(copied) == 24 and sorted(i["prompt"] for i in copied) == sorted(PROMPTS)
    for image in copied:
        assert emu.jobs[image["request_id"]].input["prompt"] == image["prompt"]
    FIGURES.append(
        (
            "a) 24-prompt pipeline (mapped submit >> deferred sensor >> copy)",
            "24 images + manifest in S3, 24 submits",
            f"run {time.monotonic() - started:.0f} s",
        )
    )
    FIGURES.append(
        (
            "b) SIGKILL of the triggerer holding the most waits",
            f"{kill['triggers']} waits taken over, 0 extra submits, 0 lost images",
            f"trigger rows reassigned {kill['takeover_s']:.1f} s after the kill (health threshold 6 s); "
            f"the {len(resumed)} waits on their requests again {min(resumed):.1f}-{max(resumed):.1f} s after it",
        )
    )


def test_a_submit_killed_after_paying_is_retried_and_reuses_its_request(stack: Stack) -> None:
    af, emu = stack.af, stack.emu
    run_id = af.trigger("flux_dist_killed_submit")
    state = af.wait_for_run("flux_dist_killed_submit", run_id, timeout=300)
    assert state == "success", af.task_instances("flux_dist_killed_submit", run_id)
    (submit,) = [t for t in af.task_instances("flux_dist_killed_submit", run_id) if t["task_id"] == "submit"]
    assert submit["try_number"] == 2
    assert _submits(emu, "a fox whose worker died") == 1, "the retry paid for a second request"
    FIGURES.append(
        ("c) submit's process SIGKILLed right after its submit", "retried, request reused", "tries 2, submits 1")
    )


def test_the_scheduler_killed_and_restarted_mid_run(stack: Stack) -> None:
    af, emu = stack.af, stack.emu
    prompts = [f"a fox that outlived its scheduler {i}" for i in range(8)]
    run_id = af.trigger("flux_dist_pipeline", {"prompts": prompts})
    af.wait_until("the first submits", lambda: _submits(emu, "a fox that outlived") >= 1, timeout=120)
    af.crash("scheduler")
    time.sleep(5)
    restarted = time.monotonic()
    af.start("scheduler")
    state = af.wait_for_run("flux_dist_pipeline", run_id, timeout=400)
    assert state == "success", af.task_instances("flux_dist_pipeline", run_id)
    assert _submits(emu, "a fox that outlived") == 8
    FIGURES.append(
        (
            "d) scheduler SIGKILLed mid-run, restarted 5 s later",
            "run completed, 8 submits for 8 prompts",
            f"run done {time.monotonic() - restarted:.0f} s after the restart",
        )
    )


def test_a_batch_survives_its_triggerer_being_killed_mid_wait(stack: Stack) -> None:
    af, emu = stack.af, stack.emu
    prompts = [f"a batch fox {i:02d}" for i in range(24)]
    # The batch's generations held running until its trigger has been taken over.
    emu.add_scenario(Scenario(hold_run="batch"), match="a batch fox")
    run_id = af.trigger("flux_dist_batch", {"prompts": prompts})
    kill = _kill_the_busiest_triggerer(af, emu, "batch", waits=1)
    assert kill["triggers"] == 1 and kill["released"] == 24, kill
    state = af.wait_for_run("flux_dist_batch", run_id, timeout=400)
    assert state == "success", af.task_instances("flux_dist_batch", run_id)
    assert _submits(emu, "a batch fox") == 24
    manifest = _manifest(stack.s3, f"dist-batch/{run_id}/manifest.json")
    assert sorted(i["prompt"] for i in manifest["images"] if i["status"] == "copied") == sorted(prompts)
    FIGURES.append(
        (
            "f) batch of 24, its triggerer SIGKILLed mid-wait",
            "completed, 24 submits for 24 prompts",
            f"takeover {kill['takeover_s']:.1f} s",
        )
    )


def test_a_window_survives_its_worker_being_killed_and_its_retry_pays_for_nothing_twice(stack: Stack) -> None:
    af, emu, s3 = stack.af, stack.emu, stack.s3
    quick = [f"a window fox, quick {i:02d}" for i in range(8)]
    held = [f"a window fox, held {i:02d}" for i in range(16)]
    # The first 8 finish at once (their lines checkpointed to S3 when the 8 slots run out); the
    # next window of 4 is held running until the worker is dead.
    emu.add_scenario(Scenario(queue_seconds=0, run_seconds=0.2), match="a window fox, quick")
    emu.add_scenario(Scenario(hold_run="window", queue_seconds=0, run_seconds=0.2), match="a window fox, held")
    run_id = af.trigger("flux_dist_window", {"prompts": quick + held})

    def awaited() -> set[str]:
        return {c.request_id for c in emu.calls() if c.kind in ("status", "stream")}

    def window_held_after_a_checkpoint() -> bool:
        held_jobs = {j.request_id for j in emu.jobs.values() if j.input["prompt"].startswith("a window fox, held")}
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix="flux/flux_dist_window/").get("Contents", [])
        checkpointed = any(".parts/" in o["Key"] for o in listed)
        # Awaited: each slot was written before its request was waited on.
        return len(held_jobs) == 4 and held_jobs <= awaited() and checkpointed

    af.wait_until("a held window after a checkpoint", window_held_after_a_checkpoint, timeout=300)
    (generate,) = [t for t in af.task_instances("flux_dist_window", run_id) if t["task_id"] == "generate"]
    worker = str(generate["hostname"])
    killed = af.crash(worker)
    released = emu.release("window")  # finished while no worker watches: kept by fal, awaited by the retry
    af.start(worker)
    state = af.wait_for_run("flux_dist_window", run_id, timeout=400)
    tis = {t["task_id"]: t for t in af.task_instances("flux_dist_window", run_id)}
    assert state == "success", tis
    assert tis["generate"]["try_number"] == 2
    jobs = sorted(
        (j.submitted_at - killed, j.input["prompt"]) for j in emu.jobs.values() if "a window fox" in j.input["prompt"]
    )
    assert len(jobs) == 24, f"paid again for a request an earlier try paid for (seconds from the kill): {jobs}"
    manifest = _manifest(s3, f"dist-window/{run_id}/manifest.json")
    copied = [i for i in manifest["images"] if i["status"] == "copied"]
    assert sorted(i["prompt"] for i in copied) == sorted(quick + held)
    for image in copied:
        assert emu.jobs[image["request_id"]].input["prompt"] == image["prompt"]
    FIGURES.append(
        (
            "g) window of 4 over 24 prompts, its Celery worker SIGKILLed mid-window",
            f"retried on a worker, 24 submits for 24 prompts ({released} held requests awaited, not paid again)",
            f"run done {time.time() - killed:.0f} s after the kill (task heartbeat timeout included)",
        )
    )


def test_the_token_is_in_no_table_and_no_log(stack: Stack) -> None:
    af = stack.af
    leaks = []
    tables = [r[0] for r in af.pg.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    for table in tables:
        for row in af.pg.query(f'SELECT * FROM "{table}"'):
            for value in row:
                if isinstance(value, memoryview | bytes):
                    value = bytes(value).decode("utf-8", "replace")
                if not isinstance(value, str | dict | list):
                    continue
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                plain = af.decrypt(text) if text.startswith("gAAAAA") else None
                if TOKEN in text or (plain and TOKEN in plain):
                    leaks.append(table)
    logs = [p for p in af.home.rglob("*") if (p.is_file() and p.suffix in (".log", ".out")) or "logs" in p.parts]
    leaking_logs = [str(p) for p in logs if p.is_file() and TOKEN in p.read_text(errors="replace")]
    assert leaks == [] and leaking_logs == []
    FIGURES.append(
        (
            "e) the API token",
            "in no PostgreSQL table, no log file",
            f"{len(tables)} tables (fernet values decrypted), {len(logs)} log files",
        )
    )
