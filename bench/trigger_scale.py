"""Part 2 of issue #6: many concurrent waits in one asyncio loop, as the triggerer runs them.

One emulator process serves the whole run (open-file limit raised; a generation lasts
``--gen-seconds``). For each N (default 1,000 and 5,000) each contender gets a *separate
worker process* (this script with ``--worker``): it imports what a triggerer has, does one
untimed warm-up wait (lazy imports, connection lookup) and says it is ready; only then are
its N requests submitted, so start-up never eats into the generations. The worker loads the
handles, takes its baseline (RSS, CPU), creates the N triggers and runs every
``trigger.run()`` in its own task of one event loop (``async for event in trigger.run()``,
like ``TriggerRunner.run_trigger``), sampling RSS and CPU every 0.5 s until every task has
its event or the deadline passes. The worker measures only itself: the emulator and the
submits live in other processes. Trigger logs go, at INFO, to a file (a triggerer writes
them too).

By default the contenders at N = 1,000 run side by side (``--side-by-side``: one process
each, at the same time, against the same emulator; CPU and RSS stay per process, latencies
share the machine), and at the largest N only the provider and the two HttpSensorTrigger
set-ups run, one at a time (``--max-n-contenders``). That keeps ``make bench`` under 10
minutes.

Contenders:

* ``flux_sse``: ``FluxStatusTrigger`` as the provider defers to it (SSE, result fetched).
* ``flux_poll``: the same trigger when the stream is refused: its polling fallback.
* ``floor``: bare SSE waits sharing one aiohttp session (stream, then the result): what a
  wait costs at the least with aiohttp.
* ``floor_own_session``: the same bare wait, but with its own ``ClientSession`` per wait (as
  each ``FluxStatusTrigger`` had before hooks shared one per loop): the price of that choice.
* ``http_status``: ``HttpSensorTrigger`` (poke 5 s) on ``status_url``, as a user would point
  it at fal: it takes the 202 of a queued request for success (false events).
* ``http_404``: ``HttpSensorTrigger`` (poke 5 s) on a URL that answers 404 until the image
  exists (the emulator's CDN path): what an ``HttpSensorTrigger`` wait costs when it does wait.

What-if variants (``--contenders flux_sse_quiet ...``, not run by default): ``flux_sse`` with
``[logging] namespace_levels = airflow_flux=WARNING`` (no progress lines), or with
``FluxStatusTrigger(api_logs=False)`` (status stream opened with ``logs=0``: smaller events, no
fal log lines).

Per wait: lost = no event by the deadline; false = event before the emulator's COMPLETED
time or not a success; late = event more than 2 s after COMPLETED.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

CONTENDERS = ("flux_sse", "flux_poll", "floor", "floor_own_session", "http_status", "http_404")
DEFAULT = ("flux_sse", "flux_poll", "floor", "http_status", "http_404")
#: At the largest N each contender runs alone, so only the ones the issue compares.
MAX_N_DEFAULT = ("flux_sse", "http_status", "http_404")
#: What-if variants of flux_sse (not run by default): the trigger with a candidate fix applied
#: from the outside, to measure what the fix would buy before anyone changes the provider.
WHAT_IF = ("flux_sse_quiet", "flux_sse_nologs")
LABELS = {
    "flux_sse": "FluxStatusTrigger (SSE)",
    "flux_poll": "FluxStatusTrigger (polling fallback)",
    "floor": "bare SSE, one shared session (floor)",
    "floor_own_session": "bare SSE, one session per wait",
    "http_status": "HttpSensorTrigger 5 s on status_url",
    "http_404": "HttpSensorTrigger 5 s, 404 until done",
    "flux_sse_quiet": "what-if: FluxStatusTrigger, airflow_flux logs at WARNING",
    "flux_sse_nologs": "what-if: FluxStatusTrigger, stream without fal logs (?logs=0)",
}
FLUX_CONN = "flux_bench"
HTTP_CONN = "http_bench"
LATE_AFTER = 2.0
SPREAD_SLOTS = 30
PAGE_KB = os.sysconf("SC_PAGE_SIZE") / 1024


# ============================================================================ worker side


def rss_kb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE_KB


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cdn_path(handle: dict[str, Any]) -> str:
    return f"/cdn/files/{handle['request_id']}/0.jpg"


def make_waiter(contender: str, handle: dict[str, Any], shared: dict[str, Any]) -> Any:
    """An object with an async-generator ``run()`` yielding one event (trigger or floor)."""
    from urllib.parse import urlsplit

    if contender.startswith("flux_"):
        from airflow_flux.triggers.flux import FluxStatusTrigger

        # With a deadline, as the sensor and the generate operator always defer.
        return FluxStatusTrigger(
            flux_conn_id=FLUX_CONN,
            handle=handle,
            end_time=time.time() + 7 * 24 * 3600,
            api_logs=contender != "flux_sse_nologs",
        )
    if contender in ("http_status", "http_404"):
        from airflow.providers.http.triggers.http import HttpSensorTrigger

        endpoint = urlsplit(handle["status_url"]).path if contender == "http_status" else cdn_path(handle)
        return HttpSensorTrigger(endpoint=endpoint, http_conn_id=HTTP_CONN, poke_interval=5.0)
    return FloorWait(handle, shared if contender == "floor" else None)


class FloorWait:
    """The least an SSE wait can cost with aiohttp: one shared session, no parsing beyond a
    substring test, then the result."""

    def __init__(self, handle: dict[str, Any], shared: dict[str, Any] | None) -> None:
        self.handle = handle
        self.shared = shared

    async def run(self) -> Any:
        import aiohttp

        if self.shared is None:
            async with aiohttp.ClientSession() as session:
                async for event in self._wait(session):
                    yield event
        else:
            async for event in self._wait(self.shared["session"]):
                yield event

    async def _wait(self, session: aiohttp.ClientSession) -> Any:
        import aiohttp

        headers = {"Authorization": f"Bearer {common.TOKEN}", "Accept": "text/event-stream"}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
        done = False
        async with session.get(
            self.handle["status_url"] + "/stream", params={"logs": "1"}, headers=headers, timeout=timeout
        ) as resp:
            async for line in resp.content:
                if line.startswith(b"data:") and b'"COMPLETED"' in line:
                    done = True
                    break
        if not done:
            yield {"status": "error"}
            return
        async with session.get(self.handle["response_url"], headers={"Authorization": headers["Authorization"]}) as r:
            await r.read()
            yield {"status": "success" if r.status == 200 else f"HTTP {r.status}"}


def payload_status(payload: Any) -> str:
    if isinstance(payload, dict):
        return str(payload.get("status"))
    return f"payload {payload!r}"


async def worker_async(args: argparse.Namespace, data: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    warmup = data["warmup"]
    shared: dict[str, Any] = {}
    if args.worker == "floor":
        shared["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    rss_imports = rss_kb()

    # Untimed warm-up on an already completed request.
    t = time.monotonic()
    async for _ in make_waiter(args.worker, warmup, shared).run():
        pass
    warmup_s = time.monotonic() - t
    del t
    # Ready: the parent submits the requests once every worker of the run has started, so
    # that start-up (imports on a shared machine) does not eat into the generations.
    # Blocking file calls are fine here: nothing else runs on this loop yet.
    Path(args.ready).touch()  # noqa: ASYNC240
    handles_file = Path(args.handles)
    while not handles_file.exists():  # noqa: ASYNC110, ASYNC240 - another process writes it
        await asyncio.sleep(0.05)
    go = json.loads(handles_file.read_text())  # noqa: ASYNC240
    handles, deadline, snapshot_at = go["handles"], go["deadline"], go.get("snapshot_at")
    del go
    gc.collect()
    await asyncio.sleep(0.2)
    if snapshot_at:
        import tracemalloc

        tracemalloc.start(args.trace_frames)
        trace_base = tracemalloc.take_snapshot()
    rss_base = rss_kb()
    hwm_reset = common.reset_hwm()

    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile(time.process_time)  # CPU, not time spent idle in epoll
        profiler.enable()
    events: dict[str, tuple[float, str]] = {}
    errors: dict[str, str] = {}
    samples: list[tuple[float, float, float, int]] = []
    t0, cpu0 = time.time(), cpu_s()

    async def consume(rid: str, waiter: Any) -> None:
        try:
            async for event in waiter.run():
                payload = getattr(event, "payload", event)
                if rid not in events:
                    events[rid] = (time.time(), payload_status(payload))
        except Exception as exc:  # counted as lost, with the reason
            errors[rid] = f"{type(exc).__name__}: {exc}"[:300]

    waiters = [(h["request_id"], make_waiter(args.worker, h, shared)) for h in handles]
    tasks = [asyncio.create_task(consume(rid, w)) for rid, w in waiters]
    del waiters
    rss_created = rss_kb()

    async def sampler() -> None:
        while True:
            samples.append((time.time(), rss_kb(), cpu_s() - cpu0, len(events)))
            await asyncio.sleep(0.5)

    sampling = asyncio.create_task(sampler())
    top: list[str] = []

    async def snapshot() -> None:
        import tracemalloc

        await asyncio.sleep(max(0.0, snapshot_at - time.time()))
        diff = tracemalloc.take_snapshot().compare_to(trace_base, args.trace_group)
        n = len(handles)
        for stat in diff[:25]:
            where = " <- ".join(
                f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno}" for f in stat.traceback
            )
            top.append(f"{stat.size_diff / n / 1024:7.2f} KB/wait {stat.count_diff / n:6.1f} blocks/wait  {where}")
        total = sum(stat.size_diff for stat in diff)
        top.insert(0, f"total traced growth {total / n / 1024:.2f} KB/wait")

    snapshotting = asyncio.create_task(snapshot()) if snapshot_at else None
    _, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.time()))
    t_end, cpu_end = time.time(), cpu_s() - cpu0
    if profiler is not None:
        profiler.disable()
    samples.append((t_end, rss_kb(), cpu_end, len(events)))
    sampling.cancel()
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, sampling, return_exceptions=True)
    if snapshotting is not None:
        await snapshotting
    if "session" in shared:
        await shared["session"].close()
    return {
        "contender": args.worker,
        "n": len(handles),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "warmup_s": warmup_s,
        "rss_imports_kb": rss_imports,
        "rss_base_kb": rss_base,
        "rss_created_kb": rss_created,
        "hwm_kb": common.hwm_kb() if hwm_reset else None,
        "t0": t0,
        "t_end": t_end,
        "last_event": max((e[0] for e in events.values()), default=None),
        "cpu_s": cpu_end,
        "samples": samples,
        "events": events,
        "errors": errors,
        "pending": len(pending),
        "tracemalloc_top": top,
        "profile": profile_summary(profiler) if profiler is not None else [],
    }


#: (substring of a code path, group) - first match wins.
PROFILE_GROUPS = (
    ("airflow_flux/", "airflow_flux"),
    ("structlog", "logging (structlog/stdlib)"),
    ("/logging/", "logging (structlog/stdlib)"),
    ("aiohttp", "aiohttp"),
    ("yarl", "aiohttp"),
    ("multidict", "aiohttp"),
    ("pydantic", "pydantic"),
    ("tenacity", "tenacity"),
    ("/asyncio/", "asyncio"),
    ("/airflow/", "airflow (connection lookup, masking, triggers)"),
    ("/json/", "json"),
    ("bench/", "benchmark harness"),
)


def profile_summary(profiler: Any, top: int = 20) -> list[str]:
    """CPU by group of code (own time) and the costliest functions, from cProfile."""
    import pstats

    stats = pstats.Stats(profiler)
    total = sum(v[2] for v in stats.stats.values()) or 1.0  # type: ignore[attr-defined]
    groups: dict[str, float] = {}
    rows = []
    for (filename, lineno, func), (_cc, _nc, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        group = next((g for key, g in PROFILE_GROUPS if key in filename), "other (C builtins, stdlib)")
        groups[group] = groups.get(group, 0.0) + tottime
        short = "/".join(Path(filename).parts[-2:])
        rows.append((tottime, cumtime, f"{short}:{lineno}({func})"))
    lines = [f"{100 * t / total:5.1f} %  {g}" for g, t in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines.append("top functions by own time (own s, cumulative s):")
    lines += [f"{t:7.3f} {c:7.3f}  {name}" for t, c, name in sorted(rows, reverse=True)[:top]]
    return lines


def worker_main(args: argparse.Namespace) -> None:
    common.raise_nofile()
    # Everything a triggerer would have imported before the triggers arrive.
    import aiohttp  # noqa: F401
    from airflow.providers.http.triggers.http import HttpSensorTrigger  # noqa: F401

    from airflow_flux.hooks.flux import FluxHook  # noqa: F401
    from airflow_flux.triggers.flux import FluxStatusTrigger  # noqa: F401

    data = json.loads(Path(args.warmup).read_text())
    result = asyncio.run(worker_async(args, data))
    Path(args.out).write_text(json.dumps(result))


async def micro_async(repeat: int) -> list[tuple[str, float]]:
    """Per-trigger set-up steps of FluxStatusTrigger, timed one by one (CPU, no I/O)."""
    import aiohttp
    from airflow.sdk import BaseHook

    from airflow_flux.hooks.flux import FluxConnectionSettings, FluxHook
    from airflow_flux.hooks.retry import DEFAULT_RETRY_POLICY
    from airflow_flux.models import FluxStatus
    from airflow_flux.triggers.flux import FluxStatusTrigger

    handle = {
        "request_id": "00000000-0000-0000-0000-000000000001",
        "status_url": "http://127.0.0.1:1/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000001/status",
        "response_url": "http://127.0.0.1:1/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000001",
        "cancel_url": "http://127.0.0.1:1/fal-ai/flux-pro/requests/00000000-0000-0000-0000-000000000001/cancel",
    }
    event = json.dumps(
        {
            "status": "IN_PROGRESS",
            "request_id": handle["request_id"],
            "logs": [
                {"message": m, "level": "INFO", "source": "user", "timestamp": "2026-01-01T00:00:00.000Z"}
                for m in ("Starting generation", "Step 10/28", "Step 20/28")
            ],
        }
    )

    async def conn_lookup() -> None:
        FluxConnectionSettings.from_connection(await BaseHook.aget_connection(FLUX_CONN))

    async def hook_settings() -> None:
        await FluxHook(flux_conn_id=FLUX_CONN).aget_settings()

    async def session() -> None:
        await aiohttp.ClientSession().close()

    async def ok() -> int:
        return 1

    async def retry_controller() -> None:
        await DEFAULT_RETRY_POLICY.aretrying()(ok)

    async def retry_call() -> None:
        await DEFAULT_RETRY_POLICY.acall(ok)

    async def trigger_init() -> None:
        FluxStatusTrigger(flux_conn_id=FLUX_CONN, handle=handle)

    async def status_event() -> None:
        FluxStatus.model_validate_json(event)

    steps = [
        ("FluxStatusTrigger(...) (handle validated)", trigger_init),
        ("connection lookup + FluxConnectionSettings", conn_lookup),
        ("FluxHook(...).aget_settings() (cached per loop and connection)", hook_settings),
        ("aiohttp.ClientSession() + close()", session),
        ("a tenacity controller around one successful call (before)", retry_controller),
        ("RetryPolicy.acall(call), one successful call (now)", retry_call),
        ("FluxStatus.model_validate_json(SSE event with 3 log lines)", status_event),
    ]
    out = []
    for name, step in steps:
        await step()  # warm
        t = time.process_time()
        for _ in range(repeat):
            await step()
        out.append((name, 1e6 * (time.process_time() - t) / repeat))
    return out


def micro_main(repeat: int) -> None:
    common.flux_conn(FLUX_CONN, "http://127.0.0.1:1")
    print(f"Per-trigger set-up steps, CPU microseconds per call (mean of {repeat}):\n")
    rows = [[name, f"{us:.0f}"] for name, us in asyncio.run(micro_async(repeat))]
    print(common.md_table(["step", "CPU us"], rows))


# ============================================================================ parent side


def interp_cpu(samples: list[list[float]], at: float) -> float:
    prev = samples[0]
    for s in samples:
        if s[0] >= at:
            if s[0] == prev[0]:
                return s[2]
            return prev[2] + (s[2] - prev[2]) * (at - prev[0]) / (s[0] - prev[0])
        prev = s
    return samples[-1][2]


def prepare(args: argparse.Namespace, emu: common.Emulator, contender: str, n: int, tmp: Path) -> dict[str, Any]:
    """Set up ``contender``'s scenarios and warm-up request, and build its worker's command."""
    queue = min(args.queue_seconds, args.gen_seconds)
    poll = contender == "flux_poll"
    # The polling fallback's requests refuse the stream; tags keep contenders apart when
    # several share the emulator at once (side by side).
    warm_tag = "#warmup-poll#" if poll else "#warmup#"
    emu.scenario(warm_tag, queue_seconds=0.0, run_seconds=0.1, **({"stream": "refuse"} if poll else {}))
    slots = SPREAD_SLOTS if args.spread > 0 else 1
    for k in range(1, slots):
        # Completions spread evenly over --spread seconds instead of one burst.
        extra = {"stream": "refuse"} if poll else {}
        emu.scenario(
            f"#s{k}#", queue_seconds=queue, run_seconds=args.gen_seconds - queue + k * args.spread / slots, **extra
        )
    if poll:  # after the spread slots: the first matching scenario wins
        emu.scenario("#poll#", queue_seconds=queue, run_seconds=args.gen_seconds - queue, stream="refuse")
    (warmup,) = asyncio.run(common.submit_many(emu.base_url, [f"{warm_tag} scale"]))
    stem = f"{contender}-{n}"
    warmup_file = tmp / f"warmup-{stem}.json"
    warmup_file.write_text(json.dumps({"warmup": warmup}))
    paths = {
        "warmup_file": warmup_file,
        "handles_file": tmp / f"handles-{stem}.json",
        "ready": tmp / f"ready-{stem}",
        "out": tmp / f"result-{stem}.json",
        "log": tmp / f"worker-{stem}.log",
    }
    env = dict(os.environ)
    common.flux_conn(FLUX_CONN, emu.base_url, env)
    common.http_conn(HTTP_CONN, emu.base_url, env)
    if contender.endswith("_quiet"):
        env["AIRFLOW__LOGGING__NAMESPACE_LEVELS"] = "airflow_flux=WARNING"
    # The provider's pool is bounded ([flux] max_connections, default 100: 75 streams); by
    # default the bench measures a triggerer configured for N streamed waits, as it also
    # raises the open-file limit. --max-connections 100 measures the default bound.
    connections = args.max_connections or n + n // 3 + 2
    env["AIRFLOW__FLUX__MAX_CONNECTIONS"] = str(connections)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(common.REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", contender]
    cmd += ["--warmup", str(paths["warmup_file"]), "--handles", str(paths["handles_file"])]
    cmd += ["--ready", str(paths["ready"]), "--out", str(paths["out"])]
    if args.cprofile:
        cmd.append("--cprofile")
    if args.tracemalloc:
        cmd += ["--trace-frames", str(args.trace_frames), "--trace-group", args.trace_group]
    return {"contender": contender, "n": n, "cmd": cmd, "env": env, "slots": slots, "poll": poll, **paths}


def submit(args: argparse.Namespace, emu: common.Emulator, prep: dict[str, Any]) -> None:
    """Submit the contender's ``n`` requests and hand them to its (waiting) worker."""
    contender, slots = prep["contender"], prep["slots"]
    poll_tag = " #poll#" if prep["poll"] else ""
    prompts = [f"scale {contender} {i} #s{i % slots}#{poll_tag}" for i in range(prep["n"])]
    t = time.time()
    prep["handles"] = asyncio.run(common.submit_many(emu.base_url, prompts))
    prep["submit_s"] = time.time() - t
    deadline = time.time() + args.gen_seconds + args.spread + args.grace + 10
    go: dict[str, Any] = {"handles": prep["handles"], "deadline": deadline}
    if args.tracemalloc:
        first_done = min(j["submitted_at"] for j in emu.jobs().values()) + args.gen_seconds
        go.update(snapshot_at=first_done + args.snapshot_offset)
    tmp = prep["handles_file"].with_suffix(".tmp")
    tmp.write_text(json.dumps(go))
    tmp.rename(prep["handles_file"])  # atomic: the worker never reads half a file


def run_group(args: argparse.Namespace, emu: common.Emulator, contenders: list[str], n: int, tmp: Path) -> list[dict]:
    """Run the contenders' workers at the same time (one at a time is a group of one)."""
    import psutil

    emu.reset()  # one emulator process for the whole run: same server for every contender
    time.sleep(2)  # let the previous run's sockets wind down
    preps = [prepare(args, emu, c, n, tmp) for c in contenders]
    running = []
    for prep in preps:
        fh = open(prep["log"], "wb")  # noqa: SIM115 - closed after the worker exits
        proc = subprocess.Popen(prep["cmd"], env=prep["env"], stdout=fh, stderr=subprocess.STDOUT, cwd=common.REPO)
        running.append((prep, proc, fh))
    started = time.time()
    while not all(p["ready"].exists() for p in preps):
        if any(proc.poll() is not None for _, proc, _ in running) or time.time() - started > 300:
            break  # a worker died or hangs: its return code tells below
        time.sleep(0.1)
    emu_proc = psutil.Process(emu.pid)
    emu_cpu0 = sum(emu_proc.cpu_times()[:2])
    for prep in preps:
        submit(args, emu, prep)
    for _, proc, fh in running:
        proc.wait()
        fh.close()
    emu_cpu = sum(emu_proc.cpu_times()[:2]) - emu_cpu0
    records = emu.requests()
    jobs = emu.jobs()
    results = []
    for prep, proc, _ in running:
        log = prep["log"]
        if proc.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker {prep['contender']} N={n} failed ({proc.returncode}):\n{tail}")
        result = json.loads(prep["out"].read_text())
        result["submit_s"] = prep["submit_s"]
        result["emulator_cpu_s"] = emu_cpu
        result["side_by_side"] = [c for c in contenders if c != prep["contender"]]
        result["log_lines"] = log.read_bytes().count(b"\n")
        analyse(result, prep["handles"], records, jobs)
        for key in ("handles_file", "out", "warmup_file", "ready"):
            prep[key].unlink()
        results.append(result)
    return results


def analyse(
    result: dict[str, Any], handles: list[dict[str, Any]], records: list[dict[str, Any]], jobs: dict[str, Any]
) -> None:
    ids = {h["request_id"] for h in handles}
    events = result.pop("events")
    calls = common.calls_by_request(records)
    first_call = common.first_call_after_submit(records)
    result_asked: dict[str, float] = {}
    for rec in records:
        if rec["kind"] == "result" and rec.get("request_id") and rec["request_id"] not in result_asked:
            result_asked[rec["request_id"]] = rec["time"]
    completed = {rid: jobs[rid]["completed_at"] for rid in ids}
    delays, lost, late, false = [], 0, 0, 0
    asked = [result_asked[rid] - completed[rid] for rid in ids if rid in result_asked and completed[rid]]
    statuses: dict[str, int] = {}
    for rid in ids:
        if rid not in events:
            lost += 1
            continue
        t_event, status = events[rid]
        statuses[status] = statuses.get(status, 0) + 1
        done = completed[rid]
        success = status in ("success", "payload True")
        if done is None or t_event < done or not success:
            false += 1
            continue
        delays.append(t_event - done)
        if t_event - done > LATE_AFTER:
            late += 1
    kinds: dict[str, float] = {}
    for rid in ids:
        for kind, count in calls.get(rid, {}).items():
            if kind != "submit":
                kinds[kind] = kinds.get(kind, 0) + count / len(ids)
    samples = result["samples"]
    base = result["rss_base_kb"]
    n = result["n"]
    # Steady state: every wait set up (last first call seen by the emulator, +1 s) until
    # the first completion (-0.5 s).
    setups = [first_call[rid] for rid in ids if rid in first_call]
    steady_from = (max(setups) + 1.0) if setups and len(setups) == len(ids) else None
    steady_to = min((c for c in completed.values() if c is not None), default=None)
    steady = None
    if steady_from is not None and steady_to is not None and steady_to - 0.5 - steady_from >= 3:
        a, b = steady_from, steady_to - 0.5
        window = [s for s in samples if a <= s[0] <= b]
        steady = {
            "seconds": b - a,
            "cpu_pct": 100 * (interp_cpu(samples, b) - interp_cpu(samples, a)) / (b - a),
            "rss_kb": common.median([s[1] for s in window]) if window else None,
        }
    peak = max([s[1] for s in samples] + ([result["hwm_kb"]] if result.get("hwm_kb") else []))
    end = result["last_event"] or result["t_end"]
    wall = end - result["t0"]
    cpu_at_end = interp_cpu(samples, end)
    result.update(
        {
            "lost": lost,
            "late": late,
            "false": false,
            "statuses": statuses,
            "calls_per_wait": kinds,
            "delay_p50": common.percentile(delays, 50),
            "delay_p99": common.percentile(delays, 99),
            "delay_max": max(delays) if delays else None,
            "asked_p50": common.percentile(asked, 50),
            "asked_p99": common.percentile(asked, 99),
            "wall_s": wall,
            "cpu_wait_s": cpu_at_end,
            "cpu_pct": 100 * cpu_at_end / wall if wall > 0 else None,
            "cpu_ms_per_wait": 1000 * cpu_at_end / n,
            "peak_rss_mb": peak / 1024,
            "peak_kb_per_wait": (peak - base) / n,
            "created_kb_per_wait": (result["rss_created_kb"] - base) / n,
            "steady": steady,
            "steady_kb_per_wait": (steady["rss_kb"] - base) / n if steady and steady["rss_kb"] else None,
            "errors_sample": sorted(set(result.get("errors", {}).values()))[:5],
        }
    )
    result["samples"] = [[round(x, 3) for x in s] for s in samples]  # t, RSS KB, CPU s, events (JSON only)
    result["n_errors"] = len(result.pop("errors", {}))


def table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        ref = next((x for x in results if x["contender"] == "flux_sse" and x["n"] == r["n"]), None)
        calls = r["calls_per_wait"]
        calls_txt = ", ".join(f"{k} {v:.1f}" for k, v in sorted(calls.items())) or "-"
        steady = r["steady"] or {}
        rows.append(
            [
                f"{r['n']:,}",
                LABELS[r["contender"]],
                f"{r['wall_s']:.1f}",
                f"{r['cpu_wait_s']:.1f}",
                f"{r['cpu_pct']:.1f}",
                common.fmt(steady.get("cpu_pct"), 1),
                f"{r['cpu_ms_per_wait']:.2f}",
                common.ratio(r["cpu_wait_s"], ref and ref["cpu_wait_s"]),
                f"{r['peak_rss_mb']:.0f}",
                common.fmt(r["steady_kb_per_wait"], 1),
                f"{r['peak_kb_per_wait']:.1f}",
                common.ratio(r["peak_kb_per_wait"], ref and ref["peak_kb_per_wait"]),
                calls_txt,
                r["lost"],
                r["late"],
                r["false"],
                " / ".join(common.fmt(r[k], 2) for k in ("delay_p50", "delay_p99", "delay_max")),
                " / ".join(common.fmt(r[k], 2) for k in ("asked_p50", "asked_p99")),
            ]
        )
    headers = [
        "N",
        "contender",
        "wall s",
        "CPU s",
        "CPU % of a core",
        "steady CPU %",
        "CPU ms/wait",
        "CPU vs flux_sse",
        "peak RSS MB",
        "KB/wait steady",
        "KB/wait peak",
        "KB/wait vs flux_sse",
        "calls/wait",
        "lost",
        "late",
        "false",
        "delay s p50/p99/max",
        "result asked s p50/p99",
    ]
    return common.md_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 5000], help="concurrent waits")
    parser.add_argument("--contenders", nargs="+", default=list(DEFAULT), choices=CONTENDERS + WHAT_IF)
    parser.add_argument(
        "--max-n-contenders",
        nargs="*",
        default=list(MAX_N_DEFAULT),
        choices=CONTENDERS + WHAT_IF,
        help="contenders at the largest N, one after another (default: the provider and HttpSensorTrigger; "
        "none given: --contenders)",
    )
    parser.add_argument(
        "--side-by-side",
        type=int,
        nargs="*",
        default=[1000],
        metavar="N",
        help="at these N, all contenders run at the same time, each in its own process (default 1000; "
        "none given: always one at a time)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=None,
        help="[flux] max_connections of the workers (default: enough for every wait to stream)",
    )
    parser.add_argument("--gen-seconds", type=float, default=60.0, help="generation time (queue + run)")
    parser.add_argument("--queue-seconds", type=float, default=1.0, help="part of it spent IN_QUEUE")
    parser.add_argument(
        "--spread",
        type=float,
        default=0.0,
        help="spread the completions over this many seconds (default 0: all N complete within the submit burst)",
    )
    parser.add_argument("--grace", type=float, default=30.0, help="seconds after the generation before 'lost'")
    parser.add_argument("--quick", action="store_true", help="200 waits, 10 s generations")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="diagnosis only (slows everything): print what the waits allocate, just before completions",
    )
    parser.add_argument("--trace-frames", type=int, default=1, help="traceback depth with --tracemalloc")
    parser.add_argument(
        "--snapshot-offset",
        type=float,
        default=-3.0,
        help="with --tracemalloc: when to look, in seconds after the first completion (default -3: while waiting)",
    )
    parser.add_argument("--trace-group", default="traceback", choices=["traceback", "filename", "lineno"])
    parser.add_argument(
        "--cprofile", action="store_true", help="diagnosis only (slows everything): where the waits spend CPU"
    )
    parser.add_argument(
        "--micro", type=int, metavar="REPEAT", help="only time FluxStatusTrigger's per-trigger set-up steps"
    )
    parser.add_argument("--worker", choices=CONTENDERS + WHAT_IF, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", help=argparse.SUPPRESS)
    parser.add_argument("--handles", help=argparse.SUPPRESS)
    parser.add_argument("--ready", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.airflow_env()
    if args.worker:
        worker_main(args)
        return
    if args.micro:
        micro_main(args.micro)
        print(f"\nCommand: `{common.command_line()}`")
        return
    if args.quick:
        args.n, args.gen_seconds = [200], 10.0
    if args.spread and args.side_by_side:
        parser.error("--spread needs --side-by-side with no N (contenders one at a time)")

    common.raise_nofile()
    common.print_header("Concurrent waits in one event loop (issue #6, part 2)")
    started = time.monotonic()
    results = []
    loads = []
    queue = min(args.queue_seconds, args.gen_seconds)
    emulator = common.Emulator(queue_seconds=queue, run_seconds=args.gen_seconds - queue, ping_interval=15.0)
    with tempfile.TemporaryDirectory(prefix="flux-scale-") as tmp, emulator as emu:
        for n in args.n:
            contenders = args.contenders
            if n == max(args.n) and args.max_n_contenders and len(args.n) > 1:
                contenders = args.max_n_contenders
            groups = [contenders] if n in args.side_by_side else [[c] for c in contenders]
            for group in groups:
                loads.append(common.load_average())
                for r in run_group(args, emu, list(group), n, Path(tmp)):
                    r["load_before"] = loads[-1]
                    results.append(r)
                    print(
                        f"<!-- {r['contender']} N={n}: wall {r['wall_s']:.1f} s, CPU {r['cpu_wait_s']:.1f} s, "
                        f"peak {r['peak_kb_per_wait']:.1f} KB/wait, lost {r['lost']}, false {r['false']}, "
                        f"late {r['late']}, errors {r['n_errors']} {r['errors_sample']}, load {loads[-1]} -->",
                        flush=True,
                    )
    print()
    print(table(results))
    print(
        f"\nGenerations of {args.gen_seconds:g} s ({args.queue_seconds:g} s queued)"
        + (f", lengthened by up to {args.spread:g} s to spread the completions" if args.spread else "")
        + ". CPU and RSS are the worker "
        "process's only, from its baseline after imports and one warm-up wait until the last event; "
        "'steady' = from the moment every wait is set up until the first completion. "
        f"Late = event > {LATE_AFTER:g} s after COMPLETED. Delay = event - COMPLETED (true events); "
        "result asked = when the emulator received the result request - COMPLETED (how fast completion was seen)."
    )
    print("\nDetails per run (baseline RSS, set-up, emulator CPU, event statuses, log lines):\n")
    for r in results:
        print(
            f"- {r['contender']} N={r['n']}: RSS after imports {r['rss_imports_kb'] / 1024:.0f} MB, baseline "
            f"{r['rss_base_kb'] / 1024:.0f} MB, {r['created_kb_per_wait']:.1f} KB/wait right after creating the "
            f"tasks; submits {r['submit_s']:.1f} s; emulator CPU {r['emulator_cpu_s']:.1f} s; statuses "
            f"{r['statuses']}; errors {r['n_errors']}; {r['log_lines']} log lines; open-file limit {r['nofile']}; "
            f"load before {r['load_before']}"
        )
    for r in (r for r in results if r["contender"] == "flux_sse"):
        steady = (r["steady"] or {}).get("cpu_pct")
        kb = r["peak_kb_per_wait"]
        n = f"{r['n']:,}"
        together = " (side by side with the other contenders)" if r.get("side_by_side") else ""
        mem = common.goal(
            f"{n} waits: <= 25 KB RSS per wait",
            f"{kb:.1f} KB at peak, {common.fmt(r['steady_kb_per_wait'], 1)} KB steady{together}",
            kb <= 25,
        )
        cpu = common.goal(
            f"{n} waits: <= 5 % of a core",
            f"{common.fmt(steady, 1)} % while waiting; {r['cpu_pct']:.1f} % over the whole minute with set-up and "
            f"completions{together}",
            steady is not None and steady <= 5,
        )
        ok = common.goal(
            f"{n} waits: 0 lost, 0 false", f"{r['lost']} lost, {r['false']} false", r["lost"] == 0 and r["false"] == 0
        )
        print(
            f"\nGoal check flux_sse N={n}: {kb:.1f} KB/wait at peak ({mem}, goal <= 25); CPU "
            f"{common.fmt(steady, 1)} % of a core while waiting ({cpu}, goal <= 5), {r['cpu_pct']:.1f} % over the "
            f"whole wait incl. set-up and completions; lost {r['lost']}, false {r['false']} ({ok}); late {r['late']}."
        )
    for r in results:
        if r.get("profile"):
            print(f"\ncProfile, {r['contender']} N={r['n']} (share of profiled own time):\n")
            print("\n".join(f"    {line}" for line in r["profile"]))
        if r.get("tracemalloc_top"):
            print(f"\ntracemalloc, {r['contender']} N={r['n']} (growth over the baseline):\n")
            print("\n".join(f"    {line}" for line in r["tracemalloc_top"]))
    print(f"\nLoad average at the end: {common.load_average()}; wall time {time.monotonic() - started:.0f} s.")
    print(f"\nCommand: `{common.command_line()}`")
    common.dump_json(args.json, {"facts": common.machine_facts(), "args": vars(args), "results": results})


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
